"""The team deployment's files against what the code expects. Docker cannot run where the tests run, so
infra/docker-compose.yml is parsed and its variables interpolated from infra/.env.example as compose
would; prefect.yaml's deployments are imported and their overrides composed; the Kubernetes base job
template is rendered with Prefect's own templating for each deployment's job variables."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from flows.config import ConfigCompositionError, compose
from flows.convert import convert

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SERVICES = {"postgres", "minio", "create-buckets", "mlflow", "prefect-server", "prefect-worker"}
LONG_RUNNING = SERVICES - {"create-buckets"}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value, env: dict[str, str], used: set[str]):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $$ is a literal $."""
    if isinstance(value, dict):
        return {key: interpolate(item, env, used) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, used) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        used.add(name)
        present = env.get(name)
        if op in (":-", "-"):
            return present if present or (op == "-" and present is not None) else arg
        if op in (":?", "?") and not present:
            raise AssertionError(f"compose would stop: {name}: {arg}")
        return present or ""

    parts = value.split("$$")
    return "$".join(_VARIABLE.sub(substitute, part) for part in parts)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(INFRA / ".env.example")


@pytest.fixture(scope="module")
def compose_file(env_example):
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    used: set[str] = set()
    resolved = interpolate(raw, env_example, used)
    resolved["_used"] = used
    return resolved


@pytest.fixture(scope="module")
def prefect_yaml():
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def command_words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(words: list[str], name: str) -> str:
    assert name in words, f"{name} missing from {words}"
    return words[words.index(name) + 1]


def test_every_variable_is_in_the_env_example_and_nothing_else(compose_file, env_example):
    used = compose_file["_used"]  # ($${POSTGRES_USER} in the healthcheck is the container's own variable)
    assert used <= set(env_example), f"not in .env.example: {sorted(used - set(env_example))}"
    unused = set(env_example) - used
    assert not unused, f".env.example sets variables compose does not read: {sorted(unused)}"


def test_services_health_checks_and_named_volumes(compose_file):
    services = compose_file["services"]
    assert set(services) == SERVICES
    for name in LONG_RUNNING:
        assert "test" in services[name]["healthcheck"], name
        assert services[name]["restart"] == "unless-stopped", name
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose_file["volumes"], f"{name} mounts undeclared volume {source}"
    assert set(compose_file["volumes"]) == {"postgres-data", "minio-data", "worker-cache"}
    init_dir = services["postgres"]["volumes"][1].split(":")[0]
    assert (INFRA / init_dir / "create-databases.sh").is_file()
    for name, wanted in {"mlflow": {"postgres", "create-buckets"}, "prefect-server": {"postgres"},
                         "prefect-worker": {"prefect-server", "mlflow", "create-buckets"}}.items():
        assert set(services[name]["depends_on"]) == wanted, name


def test_published_ports_match_what_the_servers_listen_on(compose_file, env_example):
    services = compose_file["services"]

    def published(service: str) -> dict[int, int]:
        ports = {}
        for entry in services[service]["ports"]:
            address, host, container = entry.split(":")
            assert address == env_example["BIND_ADDRESS"] == "127.0.0.1"
            ports[int(container)] = int(host)
        return ports

    mlflow_words = command_words(services["mlflow"]["command"])
    prefect_words = command_words(services["prefect-server"]["command"])
    minio_words = command_words(services["minio"]["command"])
    assert published("mlflow") == {int(option(mlflow_words, "--port")): int(env_example["MLFLOW_PORT"])}
    assert published("prefect-server") == {int(option(prefect_words, "--port")): int(env_example["PREFECT_PORT"])}
    assert published("minio") == {int(option(minio_words, "--address").lstrip(":")): int(env_example["S3_PORT"]),
                                  int(option(minio_words, "--console-address").lstrip(":")):
                                      int(env_example["MINIO_CONSOLE_PORT"])}
    # The browsers' Prefect API address is the published one.
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == \
        f"http://localhost:{env_example['PREFECT_PORT']}/api"


def test_mlflow_on_postgres_with_artifacts_in_s3_and_allowed_hosts(compose_file, env_example):
    services = compose_file["services"]
    words = command_words(services["mlflow"]["command"])
    assert words[:2] == ["mlflow", "server"]
    backend = urlparse(option(words, "--backend-store-uri"))
    assert (backend.scheme, backend.hostname, backend.port, backend.path) == (
        "postgresql", "postgres", 5432, f"/{env_example['MLFLOW_DB']}")
    assert (backend.username, backend.password) == (env_example["POSTGRES_USER"], env_example["POSTGRES_PASSWORD"])
    assert services["postgres"]["environment"]["POSTGRES_DB"] == env_example["MLFLOW_DB"]
    assert "--serve-artifacts" in words
    assert option(words, "--artifacts-destination") == f"s3://{env_example['MLFLOW_BUCKET']}/artifacts"
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = option(words, "--allowed-hosts").split(",")
    worker_mlflow = urlparse(services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"])
    assert worker_mlflow.netloc in allowed and "localhost:*" in allowed  # the worker's and a laptop's Host headers
    assert env_example["MLFLOW_ALLOWED_HOSTS"] in allowed
    build = services["mlflow"]["build"]
    dockerfile = (INFRA / build["context"] / build["dockerfile"]).read_text()
    assert "psycopg2" in dockerfile and "boto3" in dockerfile
    import mlflow  # the server image is the version the project runs

    assert build["args"]["MLFLOW_VERSION"].split(".")[0] == mlflow.__version__.split(".")[0]


def test_prefect_server_on_postgres(compose_file, env_example):
    url = urlparse(compose_file["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "postgresql+asyncpg", "postgres", 5432, f"/{env_example['PREFECT_DB']}")
    assert compose_file["services"]["postgres"]["environment"]["PREFECT_DB"] == env_example["PREFECT_DB"]


def test_worker_reaches_every_server_and_runs_the_local_deployments(compose_file, env_example, prefect_yaml):
    services = compose_file["services"]
    worker = services["prefect-worker"]
    env = worker["environment"]
    prefect_port = option(command_words(services["prefect-server"]["command"]), "--port")
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{prefect_port}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{option(command_words(services['mlflow']['command']), '--port')}"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        env_example["MINIO_ROOT_USER"], env_example["MINIO_ROOT_PASSWORD"])
    # The store the deployments write to (storage=s3 reads HYBRID_STORAGE_URI) is a bucket the job creates.
    bucket = urlparse(env["HYBRID_STORAGE_URI"]).netloc
    assert bucket == env_example["CHECKPOINT_BUCKET"]
    created = services["create-buckets"]["entrypoint"]
    assert f"local/{bucket}" in created and f"local/{env_example['MLFLOW_BUCKET']}" in created
    # GPU access, the compose spec's way.
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": env_example["GPU_COUNT"], "capabilities": ["gpu"]}]
    # It creates its pool, deploys prefect.yaml's deployments of that pool, and works on that pool.
    script = worker["command"].split("&&")
    pool = env_example["WORK_POOL"]
    create, deploy, start = (command_words(part.replace('/bin/sh -c "', "").strip(' "\n')) for part in script)
    assert create[:4] == ["prefect", "work-pool", "create", pool] and option(create, "--type") == "process"
    names = [deploy[i + 1] for i, word in enumerate(deploy) if word == "--name"]
    assert option(deploy, "--prefect-file") == "prefect.yaml" and option(deploy, "--pool") == pool
    local = {d["name"] for d in prefect_yaml["deployments"] if d["work_pool"]["name"] == pool}
    assert set(names) == local == {"tiny-local", "convert-local"}
    assert start[:3] == ["prefect", "worker", "start"] and option(start, "--pool") == pool
    # The image holds the project at the directory the deployments pull to, where the cache volume sits.
    dockerfile = (INFRA / worker["build"]["context"] / worker["build"]["dockerfile"]).read_text()
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)[-1]
    pull = prefect_yaml["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == pull == "/app"
    assert any(volume.split(":")[1] == f"{workdir}/.cache" for volume in worker["volumes"])
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"infra/Dockerfile copies {path}, which does not exist"


def test_prefect_yaml_deployments_import_the_flow_and_their_overrides_compose(prefect_yaml, monkeypatch):
    monkeypatch.setenv("HYBRID_STORAGE_URI", "s3://team-bucket/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == {"tiny-local", "convert-local", "tiny-k8s", "convert-k8s"}
    for name, deployment in deployments.items():
        path, _, function = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert getattr(module, function) is convert, name
        assert set(deployment["parameters"]) == {"overrides", "until"}
        overrides = deployment["parameters"]["overrides"]
        if "experiment=apriel_15b" in overrides:  # the user's teacher and data are required, named when missing
            with pytest.raises(ConfigCompositionError, match="teacher.path"):
                compose(overrides)
            overrides = [*overrides, "teacher.path=/models/teacher", "data.distill=/data/traces", "data.sft=/data/sft",
                         "data.eval=/data/test"]
        cfg = compose(overrides)
        assert cfg.storage.uri == "s3://team-bucket/runs" and cfg.tracking.uri == "http://mlflow:5000", name


def test_kubernetes_template_asks_for_gpus_mounts_the_secret_and_sets_the_endpoints(prefect_yaml):
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    placeholders = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert placeholders <= set(variables), sorted(placeholders - set(variables))
    # What Prefect's worker requires of a job manifest (prefect-kubernetes' base manifest).
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert manifest["spec"]["template"]["spec"]["containers"][0]["name"] == "prefect-job"

    k8s = [d for d in prefect_yaml["deployments"] if d["work_pool"]["name"] == "gpu-k8s"]
    assert k8s
    for deployment in k8s:
        job_variables = deployment["work_pool"].get("job_variables", {})
        assert set(job_variables) <= set(variables), deployment["name"]
        values = {name: spec.get("default") for name, spec in variables.items()} | job_variables
        rendered = apply_values(template["job_configuration"]["job_manifest"], values)
        pod = rendered["spec"]["template"]["spec"]
        container = pod["containers"][0]
        gpus = job_variables.get("gpus", variables["gpus"]["default"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        env = {entry["name"]: entry for entry in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": variables["aws_secret_name"]["default"], "key": key}
        assert env["MLFLOW_TRACKING_URI"]["value"] == variables["mlflow_tracking_uri"]["default"]
        assert env["AWS_ENDPOINT_URL"]["value"] == variables["s3_endpoint_url"]["default"]
        assert env["HYBRID_STORAGE_URI"]["value"] == variables["storage_uri"]["default"]
        assert container["workingDir"] == prefect_yaml["pull"][0][
            "prefect.deployments.steps.set_working_directory"]["directory"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == job_variables.get("node_selector", variables["node_selector"]["default"])
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert {"/dev/shm", "/app/.cache"} <= mounts  # NCCL's shared memory for torchrun in the pod
    eight = next(d for d in k8s if d["name"] == "convert-k8s")
    assert eight["work_pool"]["job_variables"]["gpus"] == 8
