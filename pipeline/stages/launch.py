"""Where a stage's training runs: `fit`, the one place that chooses between this process and `torchrun`,
and the torchrun launcher and worker it uses.

A training stage (teacher, convert / step / loo_step, sft, teacher_finetune) loads or builds its student,
describes its training as a `TrainingPlan` (train config, data and batch kind, teacher folder, trainable
set: configs and paths only), resolves the hardware section once (`TrainingPlan.runtime`, i.e.
`pipeline.stages.common.Runtime.resolve`: device, precision, processes, threads, torchrun or not) and
calls `fit(student, tokenizer, plan, runtime, ...)`, which trains and writes the trained checkpoint. In
this process `fit` calls the one training loop (`pipeline.train.train`); under torchrun (hardware.nproc or
nnodes > 1, train.cpu_offload, or a distributed state to resume) it launches the ranks below.

Why here and not in `pipeline.train`: the training loop's package imports only itself, but choosing and
feeding a training needs the floors above it: the data layer (`StageData` builds the batches), the
conversion's sharded build (`ModelSource`), the stages' model loading and reporting
(`pipeline.stages.common`) and the resolved hardware (`Runtime`, beside `load_model`, which takes it).
`pipeline.stages` is the lowest floor that holds all of them.

Under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.stages.launch <job.json>

(multi-node: `--nnodes M --rdzv-backend c10d --rdzv-endpoint host:port` instead of `--standalone`); the
`TrainingJob` (`TrainingPlan.job`: the plan and the runtime's device and precision) is JSON (the ranks
unpickle nothing from a work folder). Each rank builds the batch source `fit` builds in this process
(`batch_source`) and calls the one training loop (`pipeline.train.train`), which trains the FSDP2-sharded
models and keeps its state through DCP in the stage's state directory. Rank 0 prints its progress as
`@@metrics <json>` lines, which the launcher turns into the stage's reporter calls.

Two ways in, one out:
- `train_sharded_under_torchrun` (conversions and SFT: `TrainingJob.student` is a `ModelSource`): no
  process ever holds a whole model. Every rank builds the student and the teacher on the meta device,
  shards them and reads only its own shards from the checkpoints' safetensors files (the student of a
  conversion: the parent's weights plus the MIL initialisation, bit-identical to `hybridize`'s;
  `pipeline.convert.sharded`). At the end the ranks write the trained student as `save_checkpoint` would
  (the same bytes, in train.save_dtype): gathered, one tensor at a time through rank 0 (the default), or,
  with train.save_sharded, each rank its own shards through DCP, which the launcher then turns into the same
  files, one tensor at a time (key-neutral: the output is the same either way). `fit` adds the
  tokenizer. Before any rank starts, the launcher checks the sources (every weight present and of its
  shape) from their headers alone.
- `train_under_torchrun` (a model only the stage has, e.g. the demo teacher trained from scratch): the
  stage's student is saved (save_pretrained, fp32) into `<work_dir>/torchrun/student/`, every rank loads
  it whole, and at the end the ranks gather the full weights to rank 0, which writes them for the
  launcher to load into the stage's student.
The frozen teacher is built sharded in both, unless it is an imported layout (Apriel-H1, MambaInLlama),
which loads whole. Each rank's peak host memory while building its models is written to
`result/memory-rank-<r>.json` and reported in one progress line.

A failure is one line naming the rank: the rank that failed first (torchrun's root cause), with its
exception when it raised one (each rank writes `rank-<r>.error`), else its exit code or signal (in the
words of `pipeline.errors.how_it_ended`, which the MMR workers' failure lines use too);
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
from pipeline.convert.sharded import ModelSource
from pipeline.data.stage_data import StageData
from pipeline.errors import StageError, how_it_ended
from pipeline.stages.common import Reporter, Runtime, metrics_callback
from pipeline.train import TrainConfig

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
RESULT_DIR = "result"
CHECKPOINT_DIR = "checkpoint"  # in RESULT_DIR: the trained student, gathered
SHARDS_DIR = "shards"  # in RESULT_DIR: the trained student's weights, each rank's shards (train.save_sharded)
MEMORY_FILE = "memory-rank-{rank}.json"  # in RESULT_DIR: a rank's peak host memory while building its models
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
    student: ModelSource | None = None  # built sharded on the ranks; None: the student the launcher saved
    tokenizer_dir: str | None = None  # with `student`: where the tokenizer is (the batches need it)

    def to_json(self) -> str:
        return json.dumps(to_plain(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingJob:
        plain = json.loads(text)
        if not isinstance(plain, dict):
            raise StageError("the training job file is not a JSON object")
        if isinstance(plain.get("student"), dict):  # a union field, which from_plain leaves as it is
            source = plain["student"]
            plain["student"] = ModelSource(**{**source, "convert": tuple(source.get("convert", ())),
                                              "gdn": tuple(source.get("gdn", ()))})
        return from_plain(cls, plain)


STATE_DIR = "train_state"  # in a stage's work_dir: its resumable training state
TORCHRUN_DIR = "torchrun"  # in a stage's work_dir: a torchrun launch's job, log, errors and results


@dataclass(frozen=True)
class TrainingPlan:
    """What a stage trains on and how, whichever process runs it: configs and paths, no model (the student
    is `fit`'s argument, the hardware its `Runtime`)."""

    train: TrainConfig
    data: DataConfig  # the stage's data view (a generic folder of the stage's inputs already in it)
    batches: str  # "distill" | "generic" | "sft" | "teacher" (TrainingJob.batches)
    work_dir: str  # the state in <work_dir>/train_state, a torchrun launch's files in <work_dir>/torchrun
    teacher_dir: str | None = None  # the frozen teacher to distil from
    generic_every: int = 0  # batches="teacher": every this many batches from the generic corpus
    trainable_prefix: str | None = None  # train only parameters under this name
    tokenizer_dir: str | None = None  # where the ranks read the tokenizer (for a student built from its files)

    @property
    def state_dir(self) -> Path:
        return Path(self.work_dir) / STATE_DIR

    def runtime(self, hardware: HardwareConfig) -> Runtime:
        """`hardware` resolved for this training (`Runtime.resolve`: torchrun too to resume a distributed
        state in this plan's state_dir)."""
        return Runtime.resolve(hardware, self.train, self.state_dir)

    def job(self, runtime: Runtime, student: ModelSource | None = None) -> TrainingJob:
        """The ranks' job file for this plan on `runtime` (`student`: built sharded on the ranks; None: the
        student the launcher saves)."""
        return TrainingJob(train=self.train, data=self.data, batches=self.batches, state_dir=str(self.state_dir),
                           precision=runtime.precision, device=runtime.device, teacher_dir=self.teacher_dir,
                           generic_every=self.generic_every, trainable_prefix=self.trainable_prefix,
                           student=student, tokenizer_dir=self.tokenizer_dir if student is not None else None)


def fit(student, tokenizer, plan: TrainingPlan, runtime: Runtime, *, reporter: Reporter, label: str,
        out_dir: str | os.PathLike[str], what: str = "checkpoint"):
    """Train `student` as `plan` says, where `runtime` says, and write it into `out_dir` as `save_checkpoint`
    writes a checkpoint (in train.save_dtype, with `tokenizer`); returns the TrainResult. The one place
    that chooses how a stage's training runs:
    - in this process (`runtime.torchrun` false): the one training loop, the teacher loaded here;
    - under torchrun, `student` a model this process holds: `train_under_torchrun` (the student gets the
      trained weights back);
    - under torchrun, `student` a `ModelSource`: `train_sharded_under_torchrun`, the ranks build it sharded
      from its files and write the checkpoint (`what` names the source in error lines).
    Progress and metrics go to `reporter`, the lines naming `label` (the checkpoint)."""
    from pipeline.stages.common import load_model, metrics_callback, save_checkpoint
    from pipeline.train import train

    out_dir = Path(out_dir)
    if isinstance(student, ModelSource):
        if not runtime.torchrun or plan.tokenizer_dir is None:
            raise ValueError("a student built from its files (a ModelSource) trains under torchrun only, with the "
                             "plan's tokenizer_dir")
        job = plan.job(runtime, student)
        result = train_sharded_under_torchrun(job, hardware=runtime, work_dir=Path(plan.work_dir), out_dir=out_dir,
                                              reporter=reporter, label=label, what=what)
        tokenizer.save_pretrained(out_dir)
        return result
    if runtime.torchrun:
        result = train_under_torchrun(student, tokenizer, plan.job(runtime), hardware=runtime,
                                      work_dir=Path(plan.work_dir), reporter=reporter, label=label)
    else:
        teacher = load_model(plan.teacher_dir, runtime, "teacher") if plan.teacher_dir is not None else None
        batches = batch_source(plan.data, plan.batches, plan.train, tokenizer, plan.generic_every)
        result = train(student, batches, plan.train, teacher=teacher, state_dir=plan.state_dir,
                       callback=metrics_callback(reporter, label), precision=runtime.precision,
                       trainable_filter=trainable_filter(plan.trainable_prefix))
    save_checkpoint(student, tokenizer, out_dir, plan.train.save_dtype)
    return result


def train_under_torchrun(student, tokenizer, job: TrainingJob, *, hardware: HardwareConfig | Runtime, work_dir: Path,
                         reporter: Reporter, label: str):
    """Train `student` in place under torchrun (see the module docstring); returns the TrainResult."""
    from safetensors.torch import load_file

    root = _fresh_root(job, hardware, work_dir)
    (root / "student").mkdir(parents=True)
    student.save_pretrained(root / "student", safe_serialization=True)
    tokenizer.save_pretrained(root / "student")
    result = _launch(job, root, hardware, reporter, label)
    student.load_state_dict(load_file(str(root / RESULT_DIR / "model.safetensors")))
    return result


def train_sharded_under_torchrun(job: TrainingJob, *, hardware: HardwareConfig | Runtime, work_dir: Path, out_dir: Path,
                                 reporter: Reporter, label: str, what: str = "checkpoint"):
    """Train the student `job.student` describes, built sharded on the ranks, and write it into `out_dir` as
    `save_checkpoint` would in train.save_dtype, tokenizer aside (see the module docstring); returns the
    TrainResult. `what` names the student's source in error lines."""
    import torch

    from pipeline.convert.sharded import consolidate, save_plan

    if job.student is None:
        raise ValueError("train_sharded_under_torchrun needs a job whose student is a ModelSource")
    meta = check_source(job.student, torch.float32, what)  # before any rank starts
    if job.teacher_dir is not None and builds_sharded(job.teacher_dir):
        check_source(ModelSource(job.teacher_dir), torch.float32, "teacher")
    root = _fresh_root(job, hardware, work_dir)
    result = _launch(job, root, hardware, reporter, label)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if job.train.save_sharded:
        reporter.progress(f"  {label}: writing the checkpoint from each rank's shards")
        consolidate(save_plan(meta, job.train.save_dtype), root / RESULT_DIR / SHARDS_DIR, out_dir)
    else:
        for path in sorted((root / RESULT_DIR / CHECKPOINT_DIR).iterdir()):
            shutil.move(str(path), out_dir / path.name)
    return result


def builds_sharded(folder: str | os.PathLike[str]) -> bool:
    """Whether the ranks can build this checkpoint sharded: this project's layout or a transformers one
    (the imported Apriel-H1 and MambaInLlama layouts are converted while loading, whole)."""
    from pipeline.model.layouts import APRIEL_H1, MAMBAINLLAMA, detect_layout

    return detect_layout(folder) not in (APRIEL_H1, MAMBAINLLAMA)


def check_source(source: ModelSource, dtype, what: str):
    """The meta model of `source` after the checks a load makes (safetensors only, no code from the folder,
    every weight present in its shape; a conversion's surgery checks), without reading a tensor; a bad
    source is one StageError line."""
    from pipeline.convert import ConversionError
    from pipeline.convert.sharded import prepare
    from pipeline.model.safetensors_io import SafetensorsError
    from pipeline.stages.common import check_safe_to_load, require_folder

    folder = require_folder(source.folder, what)
    check_safe_to_load(folder, what)
    try:
        model, _, _ = prepare(source, dtype, what)
    except ConversionError as exc:
        raise StageError(str(exc)) from None
    except (SafetensorsError, OSError, ValueError, KeyError) as exc:  # load_model's line for the same files
        reason = " ".join(str(exc).split())[:300]
        raise StageError(f"{what} at {folder} cannot be loaded ({type(exc).__name__}: {reason}); the files are "
                         "truncated, corrupt or not a transformers checkpoint") from None
    return model


def _fresh_root(job: TrainingJob, hardware: HardwareConfig | Runtime, work_dir: Path) -> Path:
    import torch

    if job.device == "cuda" and hardware.nproc > torch.cuda.device_count():
        raise StageError(f"hardware.nproc={hardware.nproc} but this machine has {torch.cuda.device_count()} CUDA "
                         "devices (one process a GPU)")
    root = Path(work_dir) / TORCHRUN_DIR
    if root.exists():  # what a killed launch left: the training state lives in job.state_dir, not here
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def _launch(job: TrainingJob, root: Path, hardware: HardwareConfig | Runtime, reporter: Reporter, label: str):
    from pipeline.train.loop import TrainResult

    (root / JOB_FILE).write_text(job.to_json())
    command = torchrun_command(hardware, [str(root / JOB_FILE)])
    if hardware.nnodes > 1:
        reporter.progress(f"  {label}: waiting for {hardware.nnodes - 1} more node(s) at {hardware.rdzv_endpoint}; "
                          f"on each run: {' '.join(command)}")
    else:
        reporter.progress(f"  {label}: training under torchrun, {hardware.nproc} process(es)")
    run_torchrun(command, root, reporter, metrics_callback(reporter, label))
    memory = [json.loads(path.read_text()) for path in sorted((root / RESULT_DIR).glob(MEMORY_FILE.format(rank="*")))]
    measured = [entry for entry in memory if entry.get("peak_bytes") is not None]
    if measured:
        worst = max(measured, key=lambda entry: entry["peak_bytes"] / entry["model_bytes"])
        reporter.progress(f"  {label}: building the models took at most {worst['peak_bytes'] / 2**20:,.1f} MiB of host "
                          f"memory a rank ({worst['peak_bytes'] / worst['model_bytes']:.2f} of the models' "
                          f"{worst['model_bytes'] / 2**20:,.1f} MiB, rank {worst['rank']})")
    result = json.loads((root / RESULT_DIR / "result.json").read_text())
    state_path = result.pop("state_path")
    return TrainResult(**result, state_path=Path(state_path) if state_path else None)


def torchrun_command(hardware: HardwareConfig | Runtime, arguments: list[str],
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
    return f"training under torchrun failed: rank {rank} {how_it_ended(exit_code)}{where}"


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


def mixed_source(data: StageData, train_cfg: TrainConfig, generic_every: int):
    """The demo teacher's batches (a job's batches="teacher"): reasoning batches with every `generic_every`-th
    batch from the generic corpus (0 = reasoning only)."""
    reasoning = data.batch_source("distill", train_cfg.batch_size, train_cfg.seed)
    if not generic_every:
        return reasoning
    generic = data.batch_source("generic", train_cfg.batch_size, train_cfg.seed + 1)

    def from_position(position: int):
        reasoning_it = reasoning(position - position // generic_every)  # batches 0..position-1: every
        generic_it = generic(position // generic_every)  # generic_every-th of them was generic
        index = position
        while True:
            yield next(generic_it) if (index + 1) % generic_every == 0 else next(reasoning_it)
            index += 1

    return from_position


def batch_source(data_cfg: DataConfig, batches: str, train_cfg: TrainConfig, tokenizer, generic_every: int = 0):
    """The batches of a training (in this process, or on each rank): `batches` as TrainingJob.batches."""
    data = StageData(data_cfg, tokenizer)
    if batches == "teacher":
        return mixed_source(data, train_cfg, generic_every)
    return data.batch_source(batches, train_cfg.batch_size, train_cfg.seed)


def trainable_filter(prefix: str | None):
    """The trainable filter of `prefix` (train only the parameters under it; None: the config's set)."""
    return (lambda name, _param: name.startswith(prefix)) if prefix else None


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


def model_bytes(model) -> int:
    """The bytes of a model's parameters, whole (each once), whatever its sharding."""
    return sum(param.numel() * param.element_size() for param in model.parameters())


def build_models(job: TrainingJob, root: Path, runtime: Runtime):
    """(student, teacher or None, tokenizer) of this rank: built sharded where they can be (the module
    docstring), with this rank's peak host memory over the building written to the result folder."""
    import torch

    from pipeline.convert.sharded import build_sharded
    from pipeline.stages.common import load_model, load_tokenizer
    from pipeline.train.distributed import HostMemory, rank_and_world

    device = runtime.torch_device
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    memory = HostMemory().start()
    if job.student is not None:
        student = build_sharded(job.student, dtype=torch.float32, device=device, role="student",
                                cpu_offload=job.train.cpu_offload, what="student")
    else:
        student = load_model(root / "student", runtime, "student", fp32=True)
    teacher = None
    if job.teacher_dir is not None:
        if builds_sharded(job.teacher_dir):
            teacher = build_sharded(ModelSource(job.teacher_dir), dtype=runtime.dtype(), device=device,
                                    role="teacher", what="teacher")
        else:
            teacher = load_model(job.teacher_dir, runtime, "teacher")
    peak = memory.peak_increase()
    rank, _ = rank_and_world()
    folder = root / RESULT_DIR
    folder.mkdir(exist_ok=True)
    sizes = model_bytes(student) + (model_bytes(teacher) if teacher is not None else 0)
    (folder / MEMORY_FILE.format(rank=rank)).write_text(json.dumps({"rank": rank, "peak_bytes": peak,
                                                                    "model_bytes": sizes}))
    tokenizer = load_tokenizer(job.tokenizer_dir if job.student is not None else root / "student")
    return student, teacher, tokenizer


def main(job_path: str) -> None:
    """One rank of a stage's training (run by torchrun)."""
    import torch.distributed as dist

    from pipeline.convert.sharded import save_gathered, save_sharded
    from pipeline.train import train
    from pipeline.train.distributed import init_process_group, rank_and_world

    root = Path(job_path).parent
    job = TrainingJob.from_json(Path(job_path).read_text())
    init_process_group(job.device)
    try:
        rank, _ = rank_and_world()
        runtime = Runtime(device=job.device, precision=job.precision)  # resolved by the launcher
        student, teacher, tokenizer = build_models(job, root, runtime)
        result = train(
            student, batch_source(job.data, job.batches, job.train, tokenizer, job.generic_every), job.train,
            teacher=teacher, state_dir=job.state_dir,
            callback=emit_metrics if rank == 0 else None, precision=runtime.precision,
            trainable_filter=trainable_filter(job.trainable_prefix),
            max_steps_this_call=job.max_steps,
        )
        folder = root / RESULT_DIR
        if job.student is None:
            _save_full_weights(student, folder)
        elif job.train.save_sharded:
            save_sharded(student, folder / SHARDS_DIR)
        else:
            save_gathered(student, folder / CHECKPOINT_DIR, job.train.save_dtype, rank=rank)
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
