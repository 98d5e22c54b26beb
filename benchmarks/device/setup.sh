#!/usr/bin/env bash
# Set-up on the lent GPU machine (no package index there), sourced at the start of each command:
#   source benchmarks/device/setup.sh
# Installs the wheels carried in .whl/ (datasets, dill, multiprocess, gguf, fla-core), .wm/ (mamba-ssm) and
# .wc/ (causal-conv1d) into /tmp/site once, and joins the SmolLM2 GGUF from the parts carried in
# .g1/ .. .g6/ (consecutive calls; a warm machine keeps earlier calls' ignored folders) once all are there,
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
if [ ! -s "$HYBRID_SMOLLM2_GGUF" ] && [ -s .g1/part ] && [ -s .g2/part ] && [ -s .g3/part ] && [ -s .g4/part ] && [ -s .g5/part ] && [ -s .g6/part ]; then
  mkdir -p /tmp/smollm2
  cat .g1/part .g2/part .g3/part .g4/part .g5/part .g6/part > "$HYBRID_SMOLLM2_GGUF.partial"
  if [ "$(sha256sum "$HYBRID_SMOLLM2_GGUF.partial" | cut -c1-64)" = "$(cat .g1/sha256)" ]; then
    mv "$HYBRID_SMOLLM2_GGUF.partial" "$HYBRID_SMOLLM2_GGUF"
  else
    echo "setup: the joined GGUF does not match .g1/sha256"
  fi
fi
[ -s "$HYBRID_SMOLLM2_GGUF" ] && echo "setup: SmolLM2 GGUF at $HYBRID_SMOLLM2_GGUF" || echo "setup: SmolLM2 GGUF not complete yet"
python3 -c "import torch, transformers; print('setup: torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
