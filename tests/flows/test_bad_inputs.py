"""Bad inputs as a user gives them, through the command line (`python -m flows.convert`): teacher folders,
tokenizers, data files, settings, disks and servers. Each is refused with one `error:` line naming the
culprit (no traceback), before anything is written -- or, where it is a valid input after all, it runs.
docs/bad-inputs.md lists them with the line the user sees."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from flows.common import print_failure, user_error_lines
from flows.convert import main
from tests.flows.helpers import PYTHON, REPO, subprocess_env
from tests.teachers import save_tiny_teacher


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


def teacher_variant(tiny_folder: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_folder, folder)
    change(folder)
    return folder


def edit_json(path: Path, **values) -> None:
    body = json.loads(path.read_text())
    body.update(values)
    path.write_text(json.dumps(body))


def cli(tmp_path: Path, *overrides: str, plan: bool = True, until: str | None = None) -> tuple[int, list[str]]:
    """The command line, in this process: (exit code, the lines it printed to stderr)."""
    stderr, stdout = io.StringIO(), io.StringIO()
    argv = [*(["--plan"] if plan else []), *(["--until", until] if until else []), "experiment=tiny",
            f"storage.uri={tmp_path / 'artifacts'}", f"storage.cache_dir={tmp_path / 'cache'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(argv)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    return code, lines


def assert_one_line(code: int, lines: list[str], culprit: str) -> None:
    assert code == 1, lines
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    matching = [line for line in lines if culprit in line]
    assert matching and all(line.startswith("error: ") for line in lines), lines


# --- teacher folders ---------------------------------------------------------------------------------

def test_a_teacher_that_needs_its_own_code_never_prompts_and_never_runs_it(tiny_folder, tmp_path):
    """The review's case: an auto_map with a model_type transformers does not know made transformers ask
    "Do you wish to run the custom code? [y/N]" during the plan, and answering y ran the folder's file."""
    marker = tmp_path / "code-ran"

    def needs_code(folder: Path) -> None:
        edit_json(folder / "config.json", model_type="evilthing",
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})

    teacher = teacher_variant(tiny_folder, tmp_path, needs_code)
    result = subprocess.run([PYTHON, "-m", "flows.convert", "--plan", "experiment=tiny", "teacher=local",
                             f"teacher.path={teacher}", f"storage.uri={tmp_path / 'a'}",
                             f"storage.cache_dir={tmp_path / 'c'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
                            input="y\ny\ny\n", cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert not marker.exists(), "code from the teacher folder ran"
    assert "[y/N]" not in result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert ("needs Python code from its own folder (config.json auto_map: AutoConfig, AutoModelForCausalLM); code "
            "from a checkpoint folder is never run") in result.stderr


def test_every_from_pretrained_refuses_checkpoint_code():
    """No call of from_pretrained in the project may run a checkpoint's code, with or without a prompt:
    each passes trust_remote_code=False (transformers then refuses such a folder instead of asking)."""
    import ast

    missing = []
    for folder in ("pipeline", "flows", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                    flag = next((keyword.value for keyword in node.keywords if keyword.arg == "trust_remote_code"),
                                None)
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, f"from_pretrained without trust_remote_code=False: {missing}"


def int8_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file({name: (tensor * 100).to(torch.int8) for name, tensor in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize(("change", "culprit"), [
    (lambda folder: edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.T", None]}),
     "needs Python code from its own folder (tokenizer_config.json auto_map: AutoTokenizer)"),
    (int8_weights, "is stored as I8 in model.safetensors: a quantised checkpoint cannot be distilled from"),
    (lambda folder: edit_json(folder / "config.json", quantization_config={"quant_method": "bitsandbytes"}),
     "config.json has a quantization_config (bitsandbytes): a quantised checkpoint cannot be distilled from"),
    (lambda folder: edit_json(folder / "config.json", vocab_size=50),
     "its tokenizer has 104 tokens but config.json's vocab_size is 50"),
    (lambda folder: (folder / "tokenizer.json").write_text('{"version": "1.0"}'),
     "cannot be loaded (KeyError"),
    (lambda folder: (folder / "config.json").write_text("[1, 2]"),
     "config.json holds a JSON list, not an object"),
    (truncate_weights, "model.safetensors is cut short"),
    (missing_shard, "model.safetensors.index.json names 1 shard(s) that are not in the folder "
                    "(e.g. model-00002-of-00002.safetensors)"),
], ids=["tokenizer-code", "int8", "quantization-config", "vocab-smaller-than-tokenizer", "tokenizer-garbage",
        "config-not-object", "truncated-weights", "missing-shard"])
def test_a_broken_teacher_folder_is_one_line_in_the_plan(tiny_folder, tmp_path, change, culprit):
    teacher = teacher_variant(tiny_folder, tmp_path, change)
    code, lines = cli(tmp_path, "teacher=local", f"teacher.path={teacher}")
    assert_one_line(code, lines, culprit)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teacher"], "nothing written"


def test_the_teacher_stage_refuses_int8_weights_and_a_short_embedding(tiny_folder, tmp_path):
    """The same refusals where the weights are loaded (an s3:// teacher is checked there, after its download)."""
    from pipeline.config import HardwareConfig
    from pipeline.stages import StageError
    from pipeline.stages.common import check_vocabulary, load_model, load_tokenizer

    with pytest.raises(StageError, match="is stored as I8 in model.safetensors") as error:
        load_model(teacher_variant(tiny_folder, tmp_path / "a", int8_weights), HardwareConfig(device="cpu"), "teacher")
    assert "\n" not in str(error.value)
    model = load_model(tiny_folder, HardwareConfig(device="cpu"), "teacher")
    model.resize_token_embeddings(50)
    with pytest.raises(StageError, match="its tokenizer has 104 tokens but its embedding only 50 rows"):
        check_vocabulary(model, load_tokenizer(tiny_folder), "teacher at x")


def test_a_teacher_tokenizer_without_a_pad_token_runs(tiny_folder, tmp_path):
    """Most released teachers have no pad token: training batches crashed on padding with None."""
    from pipeline.chain import run_local
    from tests.stages.conftest import tiny_config

    def drop_pad(folder: Path) -> None:
        body = json.loads((folder / "tokenizer_config.json").read_text())
        body.pop("pad_token", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(body))

    cfg = tiny_config()
    cfg.teacher.path = str(teacher_variant(tiny_folder, tmp_path, drop_pad))
    cfg.storage.uri, cfg.storage.cache_dir = str(tmp_path / "store"), str(tmp_path / "cache")
    assert set(run_local(cfg, until="convert")) == {"teacher", "loo", "H-2"}


# --- data, settings, disks, servers -----------------------------------------------------------------

def test_a_user_folder_where_a_checkpoint_goes_is_refused_by_the_plan(tmp_path):
    """storage.uri + run_name may point into a user's own folders: the plan names what is in the way."""
    home = tmp_path / "home"
    (home / "Documents" / "teacher").mkdir(parents=True)
    (home / "Documents" / "teacher" / "thesis.tex").write_text("mine")
    code, lines = cli(tmp_path, f"storage.uri={home}", "run_name=Documents")
    assert_one_line(code, lines, f"storage.uri: {home / 'Documents' / 'teacher'} is a folder without a manifest of "
                                 "the store: the store writes checkpoint 'teacher' there and never moves or deletes")
    assert (home / "Documents" / "teacher" / "thesis.tex").read_text() == "mine"
    assert sorted(path.name for path in (home / "Documents").iterdir()) == ["teacher"]


@pytest.mark.parametrize(("override", "culprit"), [
    ("storage.cache_dir=/etc/hostname/cache", "storage.cache_dir: /etc/hostname/cache cannot be written "
                                              "(/etc/hostname is not a folder)"),
    ("tracking.uri=file:///tmp/mlruns", "tracking.uri: file:///tmp/mlruns is a file store"),
    ("tracking.uri=./mlruns", "tracking.uri: ./mlruns is a file store"),
    ("data.distill=https://reader:pw@data.example.com/d.csv", None),  # read by the stage: not the plan's
    ("run_name=..", "run_name must be one name of letters"),
    ("hardware.threads=-2", "hardware.threads must be an int >= 1 or null"),
    ("loo.num_examples=0", "loo.num_examples must be an int >= 1"),
    ("data.sft=''", "data.sft must be a path, URL or hub name"),
], ids=["cache-under-a-file", "mlflow-file-store", "mlflow-plain-path", "data-url", "run-name-dotdot", "threads",
        "loo-examples", "empty-data"])
def test_bad_settings_are_one_line(tmp_path, override, culprit):
    code, lines = cli(tmp_path, override)
    if culprit is None:
        assert code == 0 and lines == [], lines
        return
    if code == 2:  # refused when the config is composed
        assert len(lines) == 1 and culprit in lines[0], lines
        return
    assert_one_line(code, lines, culprit)


class _NotMLflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_is_not_mlflow_is_one_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMLflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, lines = cli(tmp_path, f"tracking.uri=http://user:hunter2@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert_one_line(code, lines, f"tracking.uri: MLflow server http://<redacted>@127.0.0.1:{server.server_port} "
                                 "cannot be reached (Not Found)")
    assert not any("hunter2" in line for line in lines)


def test_os_errors_a_user_causes_are_one_line_and_bugs_keep_their_traceback(capsys):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/cache/work/H-2/train_state")
    assert user_error_lines(full) == ["No space left on device (ENOSPC) at /cache/work/H-2/train_state: free space "
                                      "on that disk (or point storage.cache_dir / storage.uri to another disk), then "
                                      "run again: committed stages are kept and a stopped one resumes from its last "
                                      "save"]
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/run")
    assert user_error_lines(denied)[0].startswith("Permission denied (EACCES) at /data/run: fix the permissions")
    assert user_error_lines(KeyError("a bug")) is None
    try:
        {}["a bug"]
    except KeyError as bug:
        assert print_failure(bug) == 1 and "Traceback" in capsys.readouterr().err
    from pipeline.data import DataLoadError, TokenizerError
    from pipeline.train.state import StateSaveError

    for error in (DataLoadError("row 3 is bad"), TokenizerError("no tokenizer"), StateSaveError(28, "disk full")):
        assert user_error_lines(error) == [str(error)]  # were tracebacks before


@pytest.mark.slow
def test_an_unwritable_cache_is_one_line_naming_it(prefect_api, tmp_path):
    """A cache folder the OS refuses (here /sys, where even root may not create folders: EPERM; EACCES for
    other users) ends the run with one line naming the path, not a traceback."""
    code, lines = cli(tmp_path, "storage.cache_dir=/sys/hybrid-distill-test", plan=False, until="teacher")
    assert code == 1 and not any("Traceback" in line for line in lines), lines
    assert any("/sys/hybrid-distill-test" in line and ("(EPERM)" in line or "(EACCES)" in line) for line in lines), lines


def test_a_data_url_with_credentials_loads_and_keeps_them_out_of_the_cache(tmp_path, monkeypatch):
    """http(s) data URLs, which docs/bad-inputs.md says work, were taken for local paths (a .jsonl suffix)."""
    import base64

    import datasets

    from pipeline.data import DataLoadError, load_rows

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "train.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    expected = "Basic " + base64.b64encode(b"reader:pw/with-slash").decode()

    class Guarded(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            super().do_GET()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Guarded, directory=tmp_path / "www"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # a plain URL on this machine, not the hub
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    try:
        rows = load_rows(f"http://reader:pw%2Fwith-slash@127.0.0.1:{server.server_port}/train.jsonl",
                         "train")
        assert rows["text"] == ["hello", "world"]
        with pytest.raises(DataLoadError, match=r"unsupported data URL 'http://<redacted>@127.0.0.1:\d+/t.csv'"):
            load_rows(f"http://reader:pw@127.0.0.1:{server.server_port}/t.csv")
        with pytest.raises(DataLoadError, match=r"could not read http://<redacted>@127.0.0.1:\d+/missing.jsonl") as error:
            load_rows(f"http://reader:wrong@127.0.0.1:{server.server_port}/missing.jsonl")
        assert "\n" not in str(error.value) and "wrong" not in str(error.value)
    finally:
        server.shutdown()
    cached = [path for path in cache.rglob("*") if path.is_file()]
    assert any(path.parent.name == "downloads" for path in cached), "the download went to this test's cache"
    for path in cached:
        assert b"pw%2Fwith-slash" not in path.read_bytes() and b"pw/with-slash" not in path.read_bytes(), path


@pytest.mark.parametrize(("body", "culprit"), [
    ("[1, 2]\n[3, 4]\n", "line 1 is an array, not a JSON object"),
    ('"hello"\n', "line 1 is a string, not a JSON object"),
    ('{"text": "a"}\n42\n', "line 2 is a number, not a JSON object"),
    (b"\xff\xfe not text", "is not UTF-8 text"),
], ids=["arrays", "strings", "number", "binary"])
def test_rows_that_are_not_json_objects_are_named_by_the_loader(tmp_path, body, culprit):
    from pipeline.data import DataLoadError, load_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(DataLoadError, match=culprit) as error:
        load_rows(path)
    assert "\n" not in str(error.value) and "rows.jsonl" in str(error.value)
