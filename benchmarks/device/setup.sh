#!/usr/bin/env bash
# Set-up on the lent GPU machine (no package index there), sourced at the start of each command:
#   source benchmarks/device/setup.sh
# Installs the wheels carried in .whl/ (datasets, dill, multiprocess, gguf, fla-core), .wm/ (mamba-ssm) and
# .wc/ (causal-conv1d) into /tmp/site once, and joins the SmolLM2 GGUF from the parts carried in
# .g1/ .. .g6/ (consecutive calls; each part is kept in /tmp, which a warm machine keeps) once all are there,
# checked against .g1/sha256. Exports PYTHONPATH and HYBRID_SMOLLM2_GGUF.
mkdir -p /tmp/site
for folder in .whl .wm .wc; do
  [ -d "$folder" ] || continue
  for wheel in "$folder"/*.whl; do
    [ -e "$wheel" ] || continue
    stamp="/tmp/site/.installed-$(basename "$wheel")"
    [ -e "$stamp" ] && continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      && touch "$stamp" || echo "setup: could not install $wheel"
  done
done
export PYTHONPATH="/tmp/site:$PWD"
export HYBRID_SMOLLM2_GGUF=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# A call's carried folders do not outlive it: each part is kept in /tmp (which a warm machine keeps) as it comes.
mkdir -p /tmp/smollm2/parts
for i in 1 2 3 4 5 6; do [ -s ".g$i/part" ] && cp ".g$i/part" "/tmp/smollm2/parts/$i"; done
[ -s .g1/sha256 ] && cp .g1/sha256 /tmp/smollm2/parts/sha256
if [ ! -s "$HYBRID_SMOLLM2_GGUF" ] && [ -s /tmp/smollm2/parts/6 ] && ls /tmp/smollm2/parts/[1-6] >/dev/null 2>&1 \
    && [ "$(ls /tmp/smollm2/parts/[1-6] | wc -l)" = 6 ]; then
  cat /tmp/smollm2/parts/1 /tmp/smollm2/parts/2 /tmp/smollm2/parts/3 /tmp/smollm2/parts/4 /tmp/smollm2/parts/5 \
    /tmp/smollm2/parts/6 > "$HYBRID_SMOLLM2_GGUF.partial"
  if [ "$(sha256sum "$HYBRID_SMOLLM2_GGUF.partial" | cut -c1-64)" = "$(cat /tmp/smollm2/parts/sha256)" ]; then
    mv "$HYBRID_SMOLLM2_GGUF.partial" "$HYBRID_SMOLLM2_GGUF"
  else
    echo "setup: the joined GGUF does not match its sha256"
  fi
fi
[ -s "$HYBRID_SMOLLM2_GGUF" ] && echo "setup: SmolLM2 GGUF at $HYBRID_SMOLLM2_GGUF" || echo "setup: SmolLM2 GGUF not complete yet"
python3 -c "import torch, transformers; print('setup: torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
