#!/usr/bin/env bash
# The ablation over several GPUs: one `python -m flows.ablation` process per seed (seed i on GPU i mod N),
# all against the same store and tracking database (the first to reach the teacher and LOO computes them,
# the others wait on the store's leases), then one run over every seed that computes nothing and writes
# the report of all of them. Hydra overrides are passed through; for the GPU demo:
#   benchmarks/ablation_parallel.sh experiment=gpu_ablation ablation.results_dir=benchmarks/results
# SEEDS (default "0 1 2"), GPUS (default: nvidia-smi's count; 0 = leave CUDA_VISIBLE_DEVICES alone),
# PY (default python), LOGS (default .cache/ablation-logs: one log per seed).
set -euo pipefail
PY=${PY:-python}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
if [[ -z "${GPUS:-}" ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
LOGS=${LOGS:-.cache/ablation-logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
started=$(date +%s)
pids=()
for i in "${!seeds[@]}"; do
  seed=${seeds[$i]}
  if [[ "$GPUS" -gt 0 ]]; then device="CUDA_VISIBLE_DEVICES=$((i % GPUS))"; else device=""; fi
  echo "seed $seed: ${device:-(default devices)} -> $LOGS/seed-$seed.log"
  env $device "$PY" -m flows.ablation "$@" "ablation.seeds=[$seed]" > "$LOGS/seed-$seed.log" 2>&1 &
  pids+=($!)
  sleep 2  # the first process creates the Prefect and MLflow databases before the next starts
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "seed ${seeds[$i]} done at +$(( $(date +%s) - started ))s: $(grep -E '^done in' "$LOGS/seed-${seeds[$i]}.log" | tail -n 1)"
  else
    failed=1; echo "seed ${seeds[$i]} FAILED (last lines of $LOGS/seed-${seeds[$i]}.log):"; tail -n 20 "$LOGS/seed-${seeds[$i]}.log"
  fi
done
[[ $failed == 0 ]] || exit 1
all=$(IFS=,; echo "${seeds[*]}")
"$PY" -m flows.ablation "$@" "ablation.seeds=[$all]"
echo "all seeds and the report in $(( $(date +%s) - started ))s"
