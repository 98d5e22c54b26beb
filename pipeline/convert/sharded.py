"""Models built sharded: under a process group, each rank holds only its FSDP2 shards, never a whole model.

`build_sharded(source, ...)` builds the model on the meta device (shapes only), shards it as the
training loop would (`fully_shard` per decoder block, then the root), gives each rank storage for its
shards alone and fills them, row range by row range, from the checkpoint's safetensors files
(`SafetensorsFolder.read_rows`: plain reads of exactly those rows). With `source.convert` (and
`source.gdn`) it is the student of a conversion: the weights `hybridize(parent, convert, gdn_layers=gdn,
seed=seed)` gives, built the same way: every copied tensor read from the parent's files under its source
name, and each converted layer's new mixer made whole on the CPU, one layer at a time, by the very
initialisers `hybridize` calls (Mamba: `initialise_fresh` from `mixer_generator(seed, layer)`, then
`_mil_initialise`; Gated DeltaNet: `gdn_from_attention`; both from that layer's attention weights, read
whole), then sliced into this rank's rows. So the gathered weights are
bit-identical to the unsharded path's (tests/train/test_sharded_build.py compares them).

A rank's peak host memory is then about its share of the model (1/W of it) plus one layer's new mixer and
attention weights, not the whole model (that test bounds it; benchmarks/results/sharded-build-cpu.json
holds the figures).

`plan_weights` does the weight surgery's checks without reading any tensor (every target tensor has a
source of the right shape; every source tensor is used or is a replaced attention), so the stage runs it
before starting any rank. Supported sources: checkpoints in this project's layout or a plain transformers
one (config.json + safetensors files, single or with an index); the imported hybrid layouts (Apriel-H1,
MambaInLlama) load whole (`pipeline.stages.common.load_model`).
"""

from __future__ import annotations

import json

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.convert.hybridize import (
    MAMBA_OPTIONS,
    ConversionError,
    GDN_OPTIONS,
    _mil_initialise,
    _source_key,
    conversion_config,
    gdn_from_attention,
    initialise_fresh,
    mixer_generator,
)
from pipeline.model.checkpoint import layer_of
from pipeline.model.safetensors_io import SafetensorsFolder, TensorSpec


@dataclass(frozen=True)
class ModelSource:
    """What a rank builds: the checkpoint at `folder`, or with `convert` / `gdn` the conversion of those
    attention layers of it to Mamba / Gated DeltaNet (`hybridize(load(folder), convert, gdn_layers=gdn,
    gdn_options=gdn_options, seed=seed, **mamba_options)`)."""

    folder: str
    convert: tuple[int, ...] = ()
    seed: int = 0
    mamba_options: dict = field(default_factory=dict)
    gdn: tuple[int, ...] = ()
    gdn_options: dict = field(default_factory=dict)


@dataclass
class WeightPlan:
    """Where each tensor of the built model comes from (target names as in its state dict)."""

    copies: dict[str, str]  # target name -> source tensor name in the checkpoint's files
    converted: dict[str, int]  # target name -> the converted layer whose new mixer it belongs to
    is_hybrid: bool = False  # the source is a hybrid (its attention sits under .mixer.)


def _import_model_classes() -> None:
    import pipeline.model  # noqa: F401  (registers the hybrid with the Auto classes)


def skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model with every tensor on the meta device (no storage), in `dtype` as
    `from_pretrained(folder, dtype=dtype)` would hold it, with its generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    _import_model_classes()
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if (folder / "generation_config.json").is_file():
        # Read as a plain JSON file: a generation config carries no code, and this path never reaches a hub.
        model.generation_config = GenerationConfig.from_dict(
            json.loads((folder / "generation_config.json").read_text()))
    return model.eval()


def converted_skeleton(parent: nn.Module, source: ModelSource, dtype: torch.dtype) -> tuple[nn.Module, list[int], bool]:
    """The hybrid `hybridize` builds from `parent` for `source`, on the meta device: (model, the new mixers'
    layers, Mamba and Gated DeltaNet, whether the parent is a hybrid)."""
    from pipeline.model.modeling import HybridForCausalLM

    config, new_mamba, new_gdn, is_hybrid = conversion_config(
        parent, list(source.convert), (), list(source.gdn), source.gdn_options, **source.mamba_options)
    with torch.device("meta"):
        hybrid = HybridForCausalLM(config)
    hybrid.to(dtype)
    hybrid.generation_config = parent.generation_config
    return hybrid.eval(), sorted(new_mamba + new_gdn), is_hybrid


def plan_weights(model: nn.Module, files: SafetensorsFolder, new_layers: list[int], is_hybrid: bool,
                 what: str) -> WeightPlan:
    """Each tensor's source, with the weight surgery's checks as `hybridize` and `load_model` make them:
    every parameter (once: a tied lm_head is the embedding) and persistent buffer of `model` has a source
    tensor of its shape, or belongs to a new mixer; with new Mamba layers, every source tensor is carried
    over or is a replaced attention."""
    every = dict(model.named_parameters(remove_duplicate=False))
    tied = set(every) - set(dict(model.named_parameters()))
    state = model.state_dict()  # meta tensors: names and shapes
    copies: dict[str, str] = {}
    converted: dict[str, int] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for name, tensor in state.items():
        if name in tied:
            continue
        layer = layer_of(name)
        if layer in new_layers and ".mixer." in name:
            converted[name] = layer
            continue
        source = _source_key(name, is_hybrid)
        if source not in files:
            missing.append(source)
        elif tuple(files.shape(source)) != tuple(tensor.shape):
            mismatched.append(f"{source} {tuple(files.shape(source))} vs {tuple(tensor.shape)}")
        copies[name] = source
        used.add(source)
    # the lines load_model gives for the same files
    if mismatched:
        raise ConversionError(f"{what} at {files.folder}: {len(mismatched)} weights have other shapes than its "
                              f"config.json says (e.g. {'; '.join(mismatched[:2])}); the weights do not belong to "
                              "this config")
    if missing:
        raise ConversionError(f"{what} at {files.folder}: {len(missing)} weights its config.json needs are not in "
                              f"its safetensors files (e.g. {', '.join(sorted(missing)[:3])}); the checkpoint is "
                              "incomplete")
    for layer in new_layers:
        prefix = f"model.layers.{layer}.{'mixer' if is_hybrid else 'self_attn'}."
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{prefix}{part}.weight" not in files:
                raise ConversionError(f"{what} at {files.folder}: layer {layer} has no {prefix}{part}.weight "
                                      "to initialise its new mixer from")
        used.update(key for key in files.keys() if key.startswith(prefix))
    if new_layers:
        leftover = sorted(key for key in files.keys() if key not in used and key not in tied
                          and ".self_attn." not in key and ".mixer." not in key)
        if leftover:
            raise ConversionError(f"weight surgery: teacher tensors not carried over: {leftover[:5]}")
    return WeightPlan(copies, converted, is_hybrid)


def prepare(source: ModelSource, dtype: torch.dtype, what: str) -> tuple[nn.Module, WeightPlan, SafetensorsFolder]:
    """The meta model, its weight plan and the source files: everything but the tensors (cheap: the stage
    calls it to check its inputs before starting ranks; every rank calls it again)."""
    files = SafetensorsFolder(source.folder)
    parent = skeleton(source.folder, dtype)
    if not source.convert and not source.gdn:
        return parent, plan_weights(parent, files, [], isinstance(parent, _hybrid_class()), what), files
    for options, valid, kind in ((source.mamba_options, MAMBA_OPTIONS, "Mamba"),
                                 (source.gdn_options, GDN_OPTIONS, "Gated DeltaNet")):
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConversionError(f"unknown {kind} option(s) {unknown}; valid: {sorted(valid)}")
    model, new_layers, is_hybrid = converted_skeleton(parent, source, dtype)
    return model, plan_weights(model, files, new_layers, is_hybrid, what), files


def _hybrid_class():
    from pipeline.model.modeling import HybridForCausalLM

    return HybridForCausalLM


class _NewMixers:
    """Each converted layer's new mixer, made whole on the CPU when first asked for, one layer at a time."""

    def __init__(self, model: nn.Module, files: SafetensorsFolder, plan: WeightPlan, seed: int) -> None:
        self.config, self.files, self.plan, self.seed = model.config, files, plan, seed
        self.dtype = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        self.layer: int | None = None
        self.state: dict[str, Tensor] = {}

    def tensor(self, name: str) -> Tensor:
        layer = self.plan.converted[name]
        if layer != self.layer:
            self.state, self.layer = {}, None  # the previous layer's mixer goes first
            self.state, self.layer = self._build(layer), layer
        return self.state[name]

    @torch.no_grad()
    def _build(self, layer: int) -> dict[str, Tensor]:
        from pipeline.model.config import GDN
        from pipeline.model.mixers import build_mixer

        prefix = f"model.layers.{layer}.mixer."
        with torch.device("meta"):
            mixer = build_mixer(self.config, layer)
        # the dtype of the hybrid's mixer when hybridize initialises it (A_log, D, dt_bias stay fp32)
        mixer.to_empty(device="cpu").to(self.dtype[f"{prefix}in_proj.weight"])
        attention = self._attention(layer, mixer.in_proj.weight.dtype)
        if self.config.layer_types[layer] == GDN:
            gdn_from_attention(mixer, attention)  # sets every parameter; draws nothing
        else:
            initialise_fresh(mixer, mixer_generator(self.seed, layer), self.config)
            _mil_initialise(mixer, attention)
        return {prefix + name: tensor for name, tensor in mixer.state_dict().items()}

    def _attention(self, layer: int, dtype: torch.dtype) -> types.SimpleNamespace:
        """The layer's q/k/v/o projections as `_mil_initialise` and `gdn_from_attention` read them (weights and biases, whole), in
        the dtype the parent is held in."""
        prefix = f"model.layers.{layer}.{'mixer' if self.plan.is_hybrid else 'self_attn'}."

        def read(name: str) -> Tensor | None:
            key = prefix + name
            return self.files.read(key).to(dtype) if key in self.files else None

        return types.SimpleNamespace(**{
            part: types.SimpleNamespace(weight=read(f"{part}.weight"), bias=read(f"{part}.bias"))
            for part in ("q_proj", "k_proj", "v_proj", "o_proj")})


def build_sharded(source: ModelSource, *, dtype: torch.dtype, device: torch.device, role: str,
                  cpu_offload: bool = False, what: str = "checkpoint") -> nn.Module:
    """The model of `source` sharded over the current process group, each rank holding only its shards
    (module docstring). `role`: "student" (trainable) or "teacher" (frozen); `dtype`: the dtype the
    unsharded path holds it in (fp32 masters for a student); `cpu_offload`: a student's shards on the CPU."""
    from pipeline.train.distributed import materialise, shard_model

    model, plan, files = prepare(source, dtype, what)
    shard_model(model, role, cpu_offload=cpu_offload)
    mixers = _NewMixers(model, files, plan, source.seed)

    def fill(name: str, local: Tensor, start: int, stop: int) -> None:
        if name in plan.converted:
            local.copy_(mixers.tensor(name)[start:stop] if local.dim() else mixers.tensor(name))
        else:
            local.copy_(files.read_rows(plan.copies[name], start, stop).reshape(local.shape))

    materialise(model, device, fill, parameter_device=torch.device("cpu") if cpu_offload else device)
    for name, buffer in model.named_buffers():  # persistent buffers (none in the supported models) come whole
        if name in plan.copies:
            buffer.copy_(files.read(plan.copies[name]))
    return model


# --- the output checkpoint, written from the shards --------------------------------------------------

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SavePlan:
    """What `save_checkpoint(model, tokenizer, folder, save_dtype)` writes (tokenizer aside), known without
    any tensor's values: the config files' text and each saved tensor's dtype and shape, by file."""

    config_files: dict[str, str]  # file name -> its text
    specs: dict[str, TensorSpec]
    files: dict[str, list[str]]  # safetensors file name -> the tensor names it holds, in order
    sharded: bool  # several files, and an index
    cast: torch.dtype  # what save_checkpoint casts the model to


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (`fully_shard` swaps a module's class for an FSDP subclass of it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def save_plan(model: nn.Module, save_dtype: str, max_shard_size: int | str = "50GB") -> SavePlan:
    """The files `save_checkpoint(model, ..., save_dtype)` writes for `model` (sharded or not; only its
    config, class and shapes are read), worked out on a meta copy: the copy cast to `save_dtype` as
    save_checkpoint casts (Mamba's A_log and D stay fp32), config.json with the saved dtype and the
    architecture as `save_pretrained` writes them, generation_config.json, and the weights without tied
    copies, split into files as `save_pretrained` splits them at `max_shard_size`."""
    import copy as copying
    import tempfile

    from pipeline.model.safetensors_io import shard_plan

    with torch.device("meta"):
        copy = unsharded_class(model)(copying.deepcopy(model.config))
    copy.to(SAVE_DTYPES[save_dtype])
    copy.generation_config = model.generation_config
    tied = set(dict(copy.named_parameters(remove_duplicate=False))) - set(dict(copy.named_parameters()))
    specs = {name: TensorSpec(tensor.dtype, tuple(tensor.shape)) for name, tensor in copy.state_dict().items()
             if name not in tied}
    files, sharded = shard_plan(specs, max_shard_size)
    copy.config.dtype = str(copy.dtype).split(".")[1]
    copy.config.architectures = [type(copy).__name__]
    config_files = {}
    with tempfile.TemporaryDirectory() as folder:
        copy.config.save_pretrained(folder)
        if copy.can_generate():
            copy.generation_config.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            config_files[path.name] = path.read_text()
    return SavePlan(config_files, specs, files, sharded, SAVE_DTYPES[save_dtype])


def write_config_files(plan: SavePlan, folder: Path) -> None:
    for name, text in plan.config_files.items():
        (folder / name).write_text(text)


def write_weights(plan: SavePlan, folder: Path, tensor_of: Callable[[str], Tensor | None], *,
                  write: bool = True) -> None:
    """The safetensors files of `plan` in `folder` (and the index of a split save), each tensor from
    `tensor_of(name)` cast to its saved dtype. `write=False`: only call `tensor_of` in the same order (the
    ranks of a gather that do not write)."""
    from pipeline.model.safetensors_io import write_index, write_safetensors

    for file, names in plan.files.items():
        def produce(name: str) -> Tensor | None:
            tensor = tensor_of(name)
            if tensor is None:
                return None
            if tensor.is_floating_point():  # through the cast's dtype, as `model.to(save_dtype)` does: the
                tensor = tensor.to(plan.cast)  # parameters kept in fp32 (A_log, D) come back rounded to it
            return tensor.to(plan.specs[name].dtype)

        write_safetensors(folder / file, {name: plan.specs[name] for name in names}, produce,
                          metadata={"format": "pt"}, write=write)
    if write and plan.sharded:
        write_index(folder, plan.files, plan.specs)


def gathered_tensor(model: nn.Module, name: str) -> Tensor:
    """The full value of a (sharded) parameter or buffer, on the CPU of every rank (a collective when
    sharded: all ranks call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    parameters = dict(model.named_parameters())
    tensor = parameters[name] if name in parameters else model.get_buffer(name)
    if not isinstance(tensor, DTensor):
        return tensor.detach().cpu()
    mesh = tensor.device_mesh
    local = tensor.to_local().detach()
    if local.device.type != mesh.device_type:  # CPU-offloaded shards of a GPU mesh
        local = local.to(torch.device(mesh.device_type, torch.cuda.current_device()))
        tensor = DTensor.from_local(local, mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())
    return tensor.detach().full_tensor().cpu()


def save_gathered(model: nn.Module, folder: Path, save_dtype: str, *, rank: int,
                  max_shard_size: int | str = "50GB") -> SavePlan:
    """What `save_checkpoint(model, ..., save_dtype)` writes (tokenizer aside), from a sharded model: the
    ranks gather one tensor at a time and rank 0 writes it, so no rank holds more than one whole tensor
    beyond its shards. All ranks call it."""
    plan = save_plan(model, save_dtype, max_shard_size)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_config_files(plan, folder)
    write_weights(plan, folder, lambda name: gathered_tensor(model, name), write=rank == 0)
    return plan


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a save plan names, by name: each parameter once and the persistent buffers (sharded
    DTensors for a sharded model)."""
    parameters = dict(model.named_parameters())
    every = set(dict(model.named_parameters(remove_duplicate=False)))
    buffers = {name: tensor for name, tensor in model.state_dict().items() if name not in every}
    return {**parameters, **buffers}


def save_sharded(model: nn.Module, folder: Path) -> None:
    """Every rank writes its own shards of the model's weights (`torch.distributed.checkpoint`, no gather);
    `consolidate` turns them into the checkpoint. All ranks call it."""
    import torch.distributed.checkpoint as dcp

    dcp.save({name: tensor.detach() for name, tensor in saved_state(model).items()}, checkpoint_id=str(folder))


def consolidate(plan: SavePlan, shards: Path, folder: Path) -> None:
    """The checkpoint of `plan` in `folder` from the DCP weights `save_sharded` wrote in `shards`, in one
    process without a process group, reading one tensor at a time."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata

    def tensor_of(name: str) -> Tensor:
        entry = metadata[name]
        tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({name: tensor}, checkpoint_id=str(shards), no_dist=True)
        return tensor

    folder.mkdir(parents=True, exist_ok=True)
    write_config_files(plan, folder)
    write_weights(plan, folder, tensor_of)


__all__ = ["ModelSource", "SAVE_DTYPES", "SavePlan", "WeightPlan", "build_sharded", "consolidate", "gathered_tensor",
           "plan_weights", "prepare", "save_gathered", "save_plan", "save_sharded", "saved_state", "skeleton",
           "unsharded_class", "write_config_files", "write_weights"]
