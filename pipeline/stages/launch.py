"""A stage's training under `torchrun` (hardware.nproc > 1): the launcher the stage calls, and the worker.

The stage builds its student as always, then `train_under_torchrun` saves it (save_pretrained, fp32) with a
`TrainingJob` (JSON: the ranks unpickle nothing from a work folder) into `<work_dir>/torchrun/` and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.stages.launch <job.json>

(multi-node: `--nnodes M --rdzv-backend c10d --rdzv-endpoint host:port` instead of `--standalone`). Each
rank loads the student and the teacher, builds the same batch source as the stage would, and calls the
one training loop (`pipeline.train.train`), which shards with FSDP2 and keeps its state through DCP in
the stage's state directory. Rank 0 prints its progress as `@@metrics <json>` lines, which the launcher
turns into the stage's reporter calls; at the end every rank joins in gathering the full weights
(`get_model_state_dict(full_state_dict, cpu_offload)`) and rank 0 alone writes them, with the
TrainResult, to `<work_dir>/torchrun/result/`. The launcher loads them into the stage's student, which the
stage then saves with save_pretrained as always: everything downstream is unchanged.

A failure is one line naming the rank: the rank that failed first (torchrun's root cause), with its
exception when it raised one (each rank writes `rank-<r>.error`), else its exit code or signal;
torchrun's full log stays in `<work_dir>/torchrun/torchrun.log`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig, HardwareConfig, from_plain, to_plain
from pipeline.stages.common import Reporter, StageError, metrics_callback
from pipeline.train import TrainConfig

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
RESULT_DIR = "result"
LOG_FILE = "torchrun.log"
_METRICS_PREFIX = "@@metrics "


@dataclass
class TrainingJob:
    """What every rank needs to rebuild the stage's training: configs and paths only, written as JSON
    (`to_json` / `from_json`), so a rank loads data, never code, from the work folder."""

    train: TrainConfig
    data: DataConfig
    batches: str  # "distill" | "generic" | "sft": StageData.batch_source(kind); "teacher": the demo teacher's mix
    state_dir: str
    precision: str  # resolved: "fp32" | "bf16-mixed"
    device: str  # "cpu" | "cuda"
    teacher_dir: str | None = None  # the frozen teacher to distil from
    generic_every: int = 0  # batches="teacher": every this many batches from the generic corpus
    trainable_prefix: str | None = None  # train only parameters under this name (an MMR trial's mixer)
    max_steps: int | None = None  # stop after this many steps in this launch (the state lets the next continue)

    def to_json(self) -> str:
        return json.dumps(to_plain(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingJob:
        plain = json.loads(text)
        if not isinstance(plain, dict):
            raise StageError("the training job file is not a JSON object")
        return from_plain(cls, plain)


def uses_torchrun(hardware: HardwareConfig, state_dir: Path, train: TrainConfig | None = None) -> bool:
    """Train under torchrun: when asked (nproc or nnodes > 1, or `train.cpu_offload`, which offloads FSDP's
    shards), or to resume a distributed state (with one process, then: the DCP state reshards to it)."""
    from pipeline.train.distributed import latest_distributed_state

    return (hardware.nproc > 1 or hardware.nnodes > 1 or (train is not None and train.cpu_offload)
            or latest_distributed_state(state_dir) is not None)


def train_under_torchrun(student, tokenizer, job: TrainingJob, *, hardware: HardwareConfig, work_dir: Path,
                         reporter: Reporter, label: str):
    """Train `student` in place under torchrun (see the module docstring); returns the TrainResult."""
    import torch
    from safetensors.torch import load_file

    from pipeline.train.loop import TrainResult

    if job.device == "cuda" and hardware.nproc > torch.cuda.device_count():
        raise StageError(f"hardware.nproc={hardware.nproc} but this machine has {torch.cuda.device_count()} CUDA "
                         "devices (one process a GPU)")
    root = Path(work_dir) / "torchrun"
    if root.exists():  # what a killed launch left: the training state lives in job.state_dir, not here
        shutil.rmtree(root)
    (root / "student").mkdir(parents=True)
    student.save_pretrained(root / "student", safe_serialization=True)
    tokenizer.save_pretrained(root / "student")
    (root / JOB_FILE).write_text(job.to_json())
    command = torchrun_command(hardware, [str(root / JOB_FILE)])
    if hardware.nnodes > 1:
        reporter.progress(f"  {label}: waiting for {hardware.nnodes - 1} more node(s) at {hardware.rdzv_endpoint}; "
                          f"on each run: {' '.join(command)}")
    else:
        reporter.progress(f"  {label}: training under torchrun, {hardware.nproc} process(es)")
    run_torchrun(command, root, reporter, metrics_callback(reporter, label))
    result = json.loads((root / RESULT_DIR / "result.json").read_text())
    student.load_state_dict(load_file(str(root / RESULT_DIR / "model.safetensors")))
    state_path = result.pop("state_path")
    return TrainResult(**result, state_path=Path(state_path) if state_path else None)


def torchrun_command(hardware: HardwareConfig, arguments: list[str],
                     entry: tuple[str, ...] = ("-m", "pipeline.stages.launch")) -> list[str]:
    """The torchrun command line that runs `entry` (a module, or a script path) with `arguments`."""
    if hardware.nnodes > 1:
        placement = ["--nnodes", str(hardware.nnodes), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", str(hardware.rdzv_endpoint), "--rdzv-id", "hybrid-distill"]
    else:
        placement = ["--standalone", "--nnodes", "1"]
    return [sys.executable, "-m", "torch.distributed.run", *placement, "--nproc-per-node", str(hardware.nproc),
            *entry, *arguments]


def run_torchrun(command: list[str], root: Path, reporter: Reporter, callback) -> None:
    """Run `command` (a torchrun), forward rank 0's `@@metrics` lines to `callback`, other stdout lines to
    the reporter; raise one line naming the failed rank when it fails. `root` gets the log and the ranks'
    error files (the worker writes them where `HYBRID_DISTILL_RANK_ERRORS` points)."""
    from pipeline.train.loop import StepMetrics

    errors = root / "errors"
    errors.mkdir(parents=True, exist_ok=True)
    # the ranks import the same `pipeline` as this process, wherever they start
    import pipeline

    source_root = str(Path(pipeline.__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "HYBRID_DISTILL_RANK_ERRORS": str(errors), "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": python_path}
    with open(root / LOG_FILE, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=environment)
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(_METRICS_PREFIX):
                callback(StepMetrics(**json.loads(line[len(_METRICS_PREFIX):])))
            elif line.strip():
                reporter.progress(line)
        code = process.wait()
    if code != 0:
        raise StageError(failure_line(root / LOG_FILE, errors, code))


def failure_line(log_path: Path, errors: Path, code: int) -> str:
    """One line: which rank failed first and how (its exception, else its exit code or signal)."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    root_cause = text.split("Root Cause", 1)[-1]
    rank_match = re.search(r"rank\s*:\s*(\d+)", root_cause)
    exit_match = re.search(r"exitcode\s*:\s*(-?\d+)", root_cause)
    where = f" (full log: {log_path})"
    if rank_match is None:
        return f"training under torchrun failed (exit code {code}) before any rank reported{where}"
    rank = int(rank_match.group(1))
    error_file = errors / f"rank-{rank}.error"
    if error_file.is_file():
        return f"training under torchrun failed on rank {rank}: {error_file.read_text().strip()}{where}"
    exit_code = int(exit_match.group(1)) if exit_match else None
    if exit_code is not None and exit_code < 0:
        import signal

        how = f"was killed by signal {signal.Signals(-exit_code).name}"
    else:
        how = f"exited with code {exit_code}"
    return f"training under torchrun failed: rank {rank} {how}{where}"


def record_rank_error(exc: BaseException) -> None:
    """A worker's exception as one line in `rank-<r>.error` (read by `failure_line`)."""
    folder = os.environ.get("HYBRID_DISTILL_RANK_ERRORS")
    if not folder:
        return
    message = " ".join(str(exc).split())[:500]
    Path(folder, f"rank-{os.environ.get('RANK', '0')}.error").write_text(f"{type(exc).__name__}: {message}\n")


def emit_metrics(metrics) -> None:
    """Rank 0's progress, one line on stdout for the launcher."""
    print(_METRICS_PREFIX + json.dumps(dataclasses.asdict(metrics)), flush=True)


def _batch_source(job: TrainingJob, tokenizer):
    from pipeline.stages.common import StageData

    data = StageData(job.data, tokenizer)
    if job.batches == "teacher":
        from pipeline.stages.teacher import _mixed_source

        return _mixed_source(data, job.train, job.generic_every)
    return data.batch_source(job.batches, job.train.batch_size, job.train.seed)


def _save_full_weights(student, folder: Path) -> None:
    """All ranks gather; rank 0 writes model.safetensors (tensors sharing storage, e.g. tied embeddings,
    are written as copies: safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    from pipeline.train.distributed import full_model_state, rank_and_world

    state = full_model_state(student)
    if rank_and_world()[0] != 0:
        return
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    save_file(tensors, str(folder / "model.safetensors"))


def main(job_path: str) -> None:
    """One rank of a stage's training (run by torchrun)."""
    import torch.distributed as dist

    from pipeline.stages.common import load_model, load_tokenizer
    from pipeline.train import train
    from pipeline.train.distributed import init_process_group, rank_and_world

    root = Path(job_path).parent
    job = TrainingJob.from_json(Path(job_path).read_text())
    init_process_group(job.device)
    try:
        rank, _ = rank_and_world()
        hardware = HardwareConfig(device=job.device, precision=job.precision)
        student = load_model(root / "student", hardware, "student", fp32=True)
        teacher = load_model(job.teacher_dir, hardware, "teacher") if job.teacher_dir else None
        tokenizer = load_tokenizer(root / "student")
        prefix = job.trainable_prefix
        result = train(
            student, _batch_source(job, tokenizer), job.train, teacher=teacher, state_dir=job.state_dir,
            callback=emit_metrics if rank == 0 else None, precision=job.precision,
            trainable_filter=(lambda name, _param: name.startswith(prefix)) if prefix else None,
            max_steps_this_call=job.max_steps,
        )
        folder = root / RESULT_DIR
        if rank == 0:
            folder.mkdir(exist_ok=True)
        _save_full_weights(student, folder)
        if rank == 0:
            plain = dataclasses.asdict(result)
            plain["state_path"] = str(result.state_path) if result.state_path else None
            (folder / "result.json").write_text(json.dumps(plain))
        dist.barrier()
    except BaseException as exc:
        record_rank_error(exc)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m torch.distributed.run ... -m pipeline.stages.launch <job.json>")
    main(sys.argv[1])
