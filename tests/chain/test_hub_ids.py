"""Hugging Face hub ids as teacher.path / start.path, resolved from a hub cache laid out as huggingface_hub
lays it out (models--org--name/refs/<revision>, snapshots/<sha>/), offline: no network in tests."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from pipeline.chain import local_teacher_source, run_local
from pipeline.config import TeacherConfig
from pipeline.hub import HubError, hub_source, parse_hub_id

from tests.stages.conftest import tiny_config
from tests.teachers import save_tiny_teacher

SHA1, SHA2 = "1" * 40, "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding org/tiny at two commits (main -> SHA1), each a tiny teacher plus files a
    checkpoint never needs (a pickle, modeling code)."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--tiny"
    teacher = save_tiny_teacher(tmp_path / "teacher")
    for sha in (SHA1, SHA2):
        snapshot = repo / "snapshots" / sha
        shutil.copytree(teacher, snapshot)
        (snapshot / "pytorch_model.bin").write_bytes(b"pickle")
        (snapshot / "modeling_evil.py").write_text("raise SystemExit('never run')\n")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo


def test_ids_and_paths():
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None)
    assert parse_hub_id("org/name@v1.2") == ("org/name", "v1.2", None)
    assert parse_hub_id("org/name/model.Q4_1.gguf") == ("org/name", "main", "model.Q4_1.gguf")
    for local in ("./org/name", "/models/llama", "s3://bucket/t", "a/b/c", "~/x/y", "org/.."):
        assert parse_hub_id(local) is None, local


def test_a_cached_id_resolves_to_its_commit_and_checkpoint_files(hub):
    source = hub_source("org/tiny")
    assert "model.safetensors" in source.files and "config.json" in source.files
    assert not [name for name in source.files if name.endswith((".bin", ".py"))]
    assert json.loads(source.read("config.json"))["num_hidden_layers"] == 4
    assert source.fetch() == hub / "snapshots" / SHA1
    assert hub_source("org/tiny@" + SHA1).digest == source.digest  # the pinned revision is the same input
    (hub / "refs" / "main").write_text(SHA2)  # the branch moved: another input
    assert hub_source("org/tiny").digest != source.digest


def test_the_key_and_lineage_carry_the_sha(hub, tmp_path):
    cfg = tiny_config(teacher=TeacherConfig(path="org/tiny")).with_pretrained_settings()
    cfg.storage.uri, cfg.storage.cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    run_local(cfg, until="teacher")
    manifest = json.loads((tmp_path / "store" / "test" / "teacher" / "manifest.json").read_text())
    first = manifest["config_digest"]
    assert manifest["parent"]["uri"] == f"hf://org/tiny@{SHA1}"
    (hub / "refs" / "main").write_text(SHA2)
    run_local(cfg, until="teacher")
    second = json.loads((tmp_path / "store" / "test" / "teacher" / "manifest.json").read_text())["config_digest"]
    assert second != first  # same files, another commit: another key


def test_an_uncached_id_offline_is_one_line_in_seconds(hub):
    started = time.perf_counter()
    with pytest.raises(HubError) as caught:
        local_teacher_source("org/absent")
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert "\n" not in message and message.startswith("teacher.path=org/absent: hub repository org/absent")
    assert "is not in the local hub cache" in message and "HF_HUB_OFFLINE is set" in message
    with pytest.raises(HubError, match="revision v9"):
        local_teacher_source("org/tiny@v9", "start.path")


def test_a_gguf_repository_names_its_file(hub):
    (hub / "snapshots" / SHA1 / "model.gguf").write_bytes(b"GGUF")
    source = hub_source("org/tiny/model.gguf")
    assert source.files == ("model.gguf",) and source.fetch() == hub / "snapshots" / SHA1 / "model.gguf"
    with pytest.raises(HubError, match="has no file other.gguf"):
        hub_source("org/tiny/other.gguf")


@pytest.mark.parametrize(("error", "line"), [
    ("GatedRepoError", "hub repository org/gated is gated: accept its terms on huggingface.co with your account "
                       "and set HF_TOKEN"),
    ("RepositoryNotFoundError", "no hub repository org/gated (or it is private: set HF_TOKEN to a token that can "
                                "read it)"),
])
def test_gated_or_missing_repositories_are_one_line_without_the_token(monkeypatch, error, line):
    """The hub's answers as huggingface_hub raises them (no network here: HfApi.model_info replaced)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")

    import httpx

    def refuse(self, repo_id, revision=None, **kwargs):
        response = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise getattr(errors, error)(f"401 Client Error for {repo_id} with token hf_secretsecretsecret",
                                     response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    with pytest.raises(HubError) as caught:
        hub_source("org/gated")
    assert str(caught.value) == f"teacher.path=org/gated: {line}"
    assert "hf_secret" not in str(caught.value)
