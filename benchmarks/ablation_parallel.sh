#!/usr/bin/env bash
# The ablation over several GPUs: one `python -m flows.ablation` process per seed (seed i on GPU i mod N),
# all against the same store and tracking database (the first to reach the teacher and LOO computes them,
# the others wait on the store's leases), then one run over every seed that computes nothing and writes
# the report of all of them. Hydra overrides are passed through; for the GPU demo:
#   benchmarks/ablation_parallel.sh experiment=gpu_ablation ablation.results_dir=benchmarks/results
# SEEDS (default "0 1 2"), ARM_GROUPS (several processes per seed, see below), GPUS (default: nvidia-smi's count; 0 = leave CUDA_VISIBLE_DEVICES alone),
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
# One Prefect server for every process (unless PREFECT_API_URL names one): concurrent processes would each
# start a temporary server on the same fresh database and race creating its tables.
if [[ -z "${PREFECT_API_URL:-}" ]]; then
  port=${PREFECT_PORT:-4299}
  PREFECT_SERVER_ANALYTICS_ENABLED=false "$PY" -m prefect server start --host 127.0.0.1 --port "$port" \
    > "$LOGS/prefect-server.log" 2>&1 &
  server=$!
  trap 'status=$?; kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; exit $status' EXIT
  export PREFECT_API_URL="http://127.0.0.1:$port/api"
  "$PY" - "$PREFECT_API_URL/health" <<'WAIT' || { echo "the Prefect server did not start: $LOGS/prefect-server.log"; exit 1; }
import sys, time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(1)
WAIT
  echo "Prefect server at $PREFECT_API_URL ready at +$(( $(date +%s) - started ))s (log: $LOGS/prefect-server.log)"
fi
# ARM_GROUPS: the arms of each process of a seed, groups split by ';' (default: one process, every arm), e.g.
# "reasoning-rkl,generic-rkl;mix-rkl,reasoning-fkl;reasoning-rkl-mmr;reasoning-rkl-loo": four processes per
# seed; a continued arm waits for (or computes) the recipe arm's checkpoint it starts from
IFS=';' read -r -a groups <<< "${ARM_GROUPS:-}"
[[ ${#groups[@]} -gt 0 ]] || groups=("")
pids=() labels=()
job=0
for seed in "${seeds[@]}"; do
  for g in "${!groups[@]}"; do
    label="seed-$seed-$g"
    if [[ "$GPUS" -gt 0 ]]; then device="CUDA_VISIBLE_DEVICES=$((job % GPUS))"; else device=""; fi
    echo "$label: arms [${groups[$g]:-all}], ${device:-(default devices)} -> $LOGS/$label.log"
    env $device "$PY" -m flows.ablation "$@" "ablation.seeds=[$seed]" "ablation.arms=[${groups[$g]}]" \
      > "$LOGS/$label.log" 2>&1 &
    pids+=($!) labels+=("$label")
    job=$((job + 1))
  done
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "${labels[$i]} done at +$(( $(date +%s) - started ))s: $(grep -E '^done in' "$LOGS/${labels[$i]}.log" | tail -n 1)"
  else
    failed=1; echo "${labels[$i]} FAILED (last lines of $LOGS/${labels[$i]}.log):"; tail -n 20 "$LOGS/${labels[$i]}.log"
  fi
done
[[ $failed == 0 ]] || exit 1
all=$(IFS=,; echo "${seeds[*]}")
"$PY" -m flows.ablation "$@" "ablation.seeds=[$all]"
echo "all seeds and the report in $(( $(date +%s) - started ))s"
