#!/usr/bin/env bash
# Gated DeltaNet on one GPU, in one command: the fla-core kernels against the reference (GPU tests), the
# throughput at the Apriel-15B shape (teacher, H-25/30/40 with Mamba-1, with Gated DeltaNet, mixed; 4k and
# 16k), and the quality of H-K with each mixer on gpu_demo (K = 4, or GDN_COUNTS; three seeds); then the report
# (gdn-h200.json / .md). Each part has its own time limit and the next part runs whatever the last did.
#
#   bash benchmarks/gdn_gpu.sh            (writes into $OUT, default /tmp/gdn-out)
#
# Needs the wheels in .whl/ (DEVELOPERS.md): fla_core, einops, mamba_ssm, causal_conv1d. The time limits
# (seconds, T_TESTS / T_THROUGHPUT / T_QUALITY) add up to under 10 minutes; GDN_PARTS="tests throughput
# quality" picks parts (e.g. two calls: "tests throughput", then "quality" with T_QUALITY=500), and
# `python benchmarks/gdn_report.py ...` (below) merges the outputs of separate calls on any machine.
set -u
OUT=${OUT:-/tmp/gdn-out}
PARTS=${GDN_PARTS:-tests throughput quality}
T_TESTS=${T_TESTS:-100}
T_THROUGHPUT=${T_THROUGHPUT:-230}
T_QUALITY=${T_QUALITY:-240}
COUNTS=${GDN_COUNTS:-4}  # the K of the quality comparison; "4 6" doubles its processes (give it T_QUALITY=400)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || echo "WARNING: wheel install failed"
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'EOF'
import torch
from pipeline.model import kernels
for name, loader in (("fla-core", kernels._fla), ("mamba_ssm", kernels._mamba_ssm), ("causal_conv1d", kernels._causal_conv1d)):
    functions, reason = loader()
    print(f"{name}: {'OK' if functions is not None else 'MISSING ' + reason}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
EOF
started=$(date +%s)
part() { echo; echo "=== $1 ($(( $(date +%s) - started )) s) ==="; }
case " $PARTS " in *" tests "*)
  part "GPU tests: fla-core against the reference"
  timeout "$T_TESTS" python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/model/test_gdn_gpu.py \
    >"$OUT/gdn-gpu-tests.log" 2>&1
  echo "exit $?"; grep -E "(chunk torch|fused recurrent|mixer grads|engine vs|bf16 fused|torch\.(float32|bfloat16): )|passed|failed|rror" \
    "$OUT/gdn-gpu-tests.log" | tail -30 ;;
esac
case " $PARTS " in *" throughput "*)
  part "throughput at the Apriel-15B shape"
  timeout "$T_THROUGHPUT" python3 benchmarks/throughput.py --models 0,25,30,40,gdn25,gdn30,gdn40,mix25,mix30,mix40 \
    --lengths 4096,16384 --decode-steps 48 --prefill-sample 1 --full-warmup --skip-baseline --model-timeout 90 \
    --out "$OUT/gdn-throughput.json" >"$OUT/gdn-throughput.log" 2>&1
  echo "exit $?"; tail -24 "$OUT/gdn-throughput.log" ;;
esac
case " $PARTS " in *" quality "*)
  part "quality on gpu_demo: H-K (K = $COUNTS), Mamba-1 against Gated DeltaNet, 3 seeds"
  timeout "$T_QUALITY" python3 benchmarks/gpu_pipeline.py mixers --mixers mamba gdn --counts $COUNTS --seeds 0 1 2 \
    --teacher-steps 1200 --timeout $(( T_QUALITY - 15 )) --root /tmp/gpu-mixers --out "$OUT/gdn-quality.json" \
    >"$OUT/gdn-quality.log" 2>&1
  echo "exit $?"; tail -20 "$OUT/gdn-quality.log" ;;
esac
part "report"
python3 benchmarks/gdn_report.py --throughput "$OUT/gdn-throughput.json" --quality "$OUT/gdn-quality.json" \
  --tests "$OUT/gdn-gpu-tests.log" --command "bash benchmarks/gdn_gpu.sh" --out-dir "$OUT" >/dev/null \
  && echo "wrote $OUT/gdn-h200.json and $OUT/gdn-h200.md"
grep -E "^\*\*Goal" "$OUT/gdn-h200.md" || true
echo "total $(( $(date +%s) - started )) s"
