"""Training under `torchrun`: FSDP2 sharding, each rank's share of a global step, DCP training state.

The training loop takes this path whenever a process group is initialised (the worker that
`pipeline.stages.launch` starts under `torchrun --nproc-per-node N`, N >= 1); a plain call without a
process group keeps the single-process path. Nothing here all-reduces gradients or shards parameters
by hand: `fully_shard` does both.

- Sharding (`shard_models`): `fully_shard` on every decoder block (`model.model.layers`), then on the
  root (embeddings, final norm, lm_head), for the student and the frozen teacher (no optimiser state).
  No FSDP cast policy: parameters are gathered in their own dtype (the student's fp32 master weights,
  the teacher's load dtype) and "bf16-mixed" computes under the loop's autocast exactly as the plain path
  does; gradients are reduced in fp32. Optionally the student's shards live on the CPU (`cpu_offload`).
  The chunked losses read the lm_head weight outside `lm_head.forward`, so the backbone's
  hidden states come from a method registered as an FSDP forward (`hidden_states`): the root's
  parameters are gathered for it and stay gathered (FSDP's root does not reshard after forward) until
  the student's backward, or until `release` for the teacher.
- Gradients: each rank's loss is its share of the step's token sum over the step's GLOBAL trained-token
  count, times the world size W, and FSDP averages over the ranks, so the gradient is the one of the
  whole step, as in one process. (A gradient divide factor of 1 would say the same, but gloo has no
  PREMUL_SUM reduction.)
- A step's share (`step_share`): with `grad_accum` divisible by the world size, rank r takes micro-batches
  r, r+W, ...; else every micro-batch's rows are split over the ranks (a rank left without rows gets one
  row with no trained targets: every rank must run the same forwards and backwards for the collectives).
- State (`save_distributed_state`, `latest_distributed_state`, `load_distributed_state`):
  `<state_dir>/dcp-step-00000040/` holds the model and AdamW state written by `torch.distributed.checkpoint`
  (each rank its shards) and `trainer.pt` (rank 0: step, data position, RNG, config). It is written to
  `.dcp-step-00000040.tmp/` and renamed by rank 0 once every rank has written, so a `dcp-step-*`
  directory is complete, and the previous state is removed only after that rename (the same step saved
  again is renamed to `dcp-step-00000040.1/`: there is never a moment without a complete state). DCP
  reshards on load, so a state resumes on any number of processes.
  RNG: every rank seeds and restores the same (rank 0's) state; training draws no random numbers per rank.
"""

from __future__ import annotations

import os
import re
import shutil
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.train.batches import PreparedBatch

_DCP_STATE_NAME = re.compile(r"^dcp-step-(\d{8,})(?:\.(\d+))?$")
_DCP_TEMPORARY_NAME = re.compile(r"^\.dcp-step-\d{8,}(?:\.\d+)?\.tmp$")
_TRAINER_FILE = "trainer.pt"
STATE_FORMAT_VERSION = 1


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group (then the loop shards with FSDP2)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_process_group(device_type: str) -> torch.device:
    """Join the group `torchrun` describes in the environment: NCCL on CUDA (one device per local rank),
    gloo on CPU. Returns this rank's device."""
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _decoder_blocks(model: nn.Module, role: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"the {role} has no model.layers list of decoder blocks to shard")
    return layers


def _hidden_states(self: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states (B, T, H) of the backbone; registered as an FSDP forward of the root."""
    return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def shard_model(model: nn.Module, role: str, *, cpu_offload: bool = False) -> None:
    """`fully_shard` each decoder block, then the root, of one model (in place; see `shard_models`). `role`
    "teacher": frozen (no gradients). Works on a model whose parameters are on the meta device too (then
    `materialise` gives each rank its shards)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    if role == "teacher":
        for param in model.parameters():
            param.requires_grad_(False)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in _decoder_blocks(model, role):
        fully_shard(block, offload_policy=offload)
    fully_shard(model, offload_policy=offload)
    model.hidden_states = types.MethodType(_hidden_states, model)
    register_fsdp_forward_method(model, "hidden_states")


def shard_models(student: nn.Module, teacher: nn.Module | None, *, cpu_offload: bool = False) -> None:
    """`fully_shard` each decoder block, then the root, of the student and the teacher (in place); a model
    already sharded (built sharded, `pipeline.convert.sharded`) is left as it is.

    No FSDP mixed-precision cast: parameters are gathered in their own dtype (the student's fp32 masters,
    the teacher's load dtype) and the loop's bf16 autocast computes as in the plain path. (FSDP's
    `param_dtype=bf16` would also round the parameters the plain path keeps in fp32 inside its computation:
    Mamba's A_log, D and dt bias, the norm scales, the embeddings and with them the fp32 residual stream.)
    Gradients are reduced in fp32 (their dtype). `cpu_offload`: the student's sharded parameters, gradients
    and AdamW state live in CPU memory and the optimiser steps there (FSDP2's `CPUOffloadPolicy`)."""
    for model, role in ((student, "student"), (teacher, "teacher")):
        if model is not None and not is_sharded(model):
            shard_model(model, role, cpu_offload=cpu_offload and role == "student")


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` has been applied to this model (its root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def compute_device(model: nn.Module) -> torch.device:
    """Where a model computes: its parameters' device, or for a sharded model its mesh's device (with
    CPU offload its shards live on the CPU, yet it computes on the GPU)."""
    from torch.distributed.tensor import DTensor

    param = next(model.parameters())
    if isinstance(param, DTensor) and param.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def row_range(param: Tensor) -> tuple[int, int]:
    """[start, stop) of dimension 0 that this rank's shard of an FSDP2 parameter holds (the whole tensor
    for a plain one). FSDP2 shards dimension 0 as `torch.chunk` does: ceil(n / W) rows a rank, the last
    ranks fewer or none."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, (param.shape[0] if param.dim() else 1)
    if param.dim() == 0 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise ValueError(f"expected a parameter sharded on dimension 0 over one mesh dimension, got {param.placements}")
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    local = param.to_local().shape[0]
    if local != stop - start:
        raise ValueError(f"a shard of {local} rows where dimension 0 chunking gives [{start}, {stop})")
    return start, stop


def _buffers_built_again(module: nn.Module) -> dict[str, Tensor] | None:
    """The buffers of a module that keeps its config (transformers' rotary embeddings do), as its
    constructor computes them: a copy of it built on the CPU from that config. None for other modules."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    try:
        with torch.device("cpu"):
            fresh = type(module)(config=config)
    except TypeError:
        return None
    buffers = dict(fresh.named_buffers(recurse=False))
    own = {name for name, buffer in module._buffers.items() if buffer is not None}
    return buffers if set(buffers) == own else None


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device, fill: Callable[[str, Tensor, int, int], None], *,
                parameter_device: torch.device | None = None) -> None:
    """Give a model built on the meta device (and sharded) real storage and values: each parameter's local
    shard is allocated on `parameter_device` (default `device`; the CPU under CPU offload) and filled by
    `fill(name, local_shard, start, stop)` (rows [start, stop) of the full tensor); the non-persistent
    buffers (rotary frequencies) are computed again, on the CPU then moved to `device`: by the module's own
    constructor from its config where it keeps one, else as `from_pretrained` does (`_init_weights` of the
    module). Tied parameters are filled once, by their first name."""
    model.to_empty(device=parameter_device or device)
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            fresh = _buffers_built_again(module)
            if fresh is None:  # what from_pretrained does for the buffers a checkpoint lacks
                model._init_weights(module)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = (fresh[name] if fresh is not None else buffer).to(device)
    for name, param in model.named_parameters():
        start, stop = row_range(param)
        fill(name, param.to_local() if hasattr(param, "to_local") else param.data, start, stop)


def release(model: nn.Module) -> None:
    """Free the gathered root parameters of a frozen model after its forward (it has no backward)."""
    model.reshard()


def full_value(value: Tensor) -> Tensor:
    """A DTensor's full value (e.g. the gradient norm clip_grad_norm_ returns under FSDP), else itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def step_share(micro_batches: Sequence[PreparedBatch], rank: int, world: int) -> list[PreparedBatch]:
    """This rank's part of one optimiser step (see the module docstring)."""
    if world == 1:
        return list(micro_batches)
    if len(micro_batches) % world == 0:
        return list(micro_batches[rank::world])
    return [_rows_share(batch, rank, world) for batch in micro_batches]


def _rows_share(batch: PreparedBatch, rank: int, world: int) -> PreparedBatch:
    rows = torch.arange(batch.input_ids.shape[0]).tensor_split(world)[rank]
    if rows.numel() == 0:  # fewer rows than ranks: a stand-in row that trains nothing
        return PreparedBatch(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1],
                             target_mask=torch.zeros_like(batch.target_mask[:1]), input_tokens=0)
    rows = rows.to(batch.input_ids.device)
    attention_mask = batch.attention_mask[rows]
    return PreparedBatch(input_ids=batch.input_ids[rows], attention_mask=attention_mask,
                         target_mask=batch.target_mask[rows], input_tokens=int(attention_mask.sum()))


def sum_over_ranks(values: Tensor) -> Tensor:
    """The step's metric sums (loss, KL, CE) over the ranks, for reporting (not gradients)."""
    if is_distributed():
        reduced = values.clone()
        dist.all_reduce(reduced)
        return reduced
    return values


class HostMemory:
    """This process's peak resident set over a stretch of code, from Linux's high-water mark (VmHWM in
    /proc/self/status, reset by writing 5 to /proc/self/clear_refs): `start()` resets it and notes the
    resident set, `peak_increase()` is the high-water mark since, less that. Anonymous and file pages both
    count, so reading files through a memory map would count the pages touched; the builders read with
    plain reads. None where the kernel offers neither file."""

    def __init__(self) -> None:
        self.baseline: int | None = None

    @staticmethod
    def _status(field_name: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    def start(self) -> HostMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.baseline = None
            return self
        self.baseline = self._status("VmRSS")
        return self

    def peak_increase(self) -> int | None:
        peak = self._status("VmHWM")
        return None if peak is None or self.baseline is None else peak - self.baseline


# --- training state through torch.distributed.checkpoint ------------------------------------------

def latest_distributed_state(state_dir: str | os.PathLike[str]) -> Path | None:
    root = Path(state_dir)
    if not root.is_dir():
        return None
    found = [(int(match.group(1)), int(match.group(2) or 0), path) for path in root.iterdir()
             if (match := _DCP_STATE_NAME.match(path.name)) and (path / _TRAINER_FILE).is_file()]
    return max(found)[2] if found else None


def save_distributed_state(state_dir: str | os.PathLike[str], *, step: int, model: nn.Module,
                           optimizer: torch.optim.Optimizer, trainer: dict[str, Any]) -> Path:
    """Every rank writes its shards; rank 0 writes trainer.pt, renames, and drops older states.

    The complete state stays in place until the new one is renamed beside it: the same step saved again
    gets the next generation's name (`dcp-step-00000040.1`, `.2`, ...; the newest one is resumed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, _ = rank_and_world()
    root = Path(state_dir)
    name = [f"dcp-step-{step:08d}"]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        previous = latest_distributed_state(root)
        match = _DCP_STATE_NAME.match(previous.name) if previous is not None else None
        if match and int(match.group(1)) == step:
            name = [f"dcp-step-{step:08d}.{int(match.group(2) or 0) + 1}"]
    dist.broadcast_object_list(name, src=0)
    final = root / name[0]
    temporary = root / f".{final.name}.tmp"
    if rank == 0:
        for path in root.iterdir():  # what a kill left: temporaries, and states newer names replaced
            if path.is_dir() and path != previous and (_DCP_STATE_NAME.match(path.name)
                                                       or _DCP_TEMPORARY_NAME.match(path.name)):
                shutil.rmtree(path)
        temporary.mkdir()
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(temporary))
    if rank == 0:
        torch.save({"format_version": STATE_FORMAT_VERSION, **trainer}, temporary / _TRAINER_FILE)
    dist.barrier()
    if rank == 0:
        os.replace(temporary, final)  # the commit: from here on the newest complete state
        for path in root.iterdir():
            if path != final and path.is_dir() and (_DCP_STATE_NAME.match(path.name)
                                                    or _DCP_TEMPORARY_NAME.match(path.name)):
                shutil.rmtree(path)
    dist.barrier()
    return final


def read_distributed_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    trainer = torch.load(Path(path) / _TRAINER_FILE, weights_only=True)
    if trainer.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{Path(path) / _TRAINER_FILE} has state format {trainer.get('format_version')!r}, "
                         f"expected {STATE_FORMAT_VERSION}")
    return trainer


def load_distributed_state(path: str | os.PathLike[str], *, model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """Load the model and AdamW state of a `dcp-step-*` directory, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights, gathered to rank 0's CPU (other ranks get an empty dict); all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = [
    "HostMemory",
    "compute_device",
    "full_model_state",
    "full_value",
    "init_process_group",
    "is_distributed",
    "is_sharded",
    "latest_distributed_state",
    "load_distributed_state",
    "materialise",
    "rank_and_world",
    "read_distributed_trainer_state",
    "release",
    "row_range",
    "save_distributed_state",
    "shard_model",
    "shard_models",
    "step_share",
    "sum_over_ranks",
]
