"""safetensors files read a row range at a time, and written a tensor at a time.

What a rank of a sharded model needs: `SafetensorsFolder.read_rows` reads rows [start, stop) of one tensor
(dimension 0; a 0-d tensor is one row) straight from the file into a fresh buffer, with plain reads, not a
memory map, so the process holds only those rows (the pages of a mapped file count in its resident set
while mapped); `write_safetensors` writes a file whose header is known in advance (names, dtypes, shapes)
and whose tensors come one by one, so the writer never holds more than one tensor. The files it writes are
byte for byte those `safetensors.torch.save_file` writes for the same tensors and metadata (the format: an
8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, then the tensors'
bytes in the header's order; tensors sorted by dtype, widest first, then by name).

A folder is read through `model.safetensors.index.json` when it has one (transformers' sharded layout),
else from its `*.safetensors` files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names, and the order its writer sorts tensors in (widest dtype first)
_DTYPES: dict[str, torch.dtype] = {
    "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16,
    "F16": torch.float16, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_WRITE_ORDER = {name: rank for rank, name in enumerate(_DTYPES)}


class SafetensorsError(ValueError):
    """A safetensors file or folder that cannot be read as asked."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @property
    def row_bytes(self) -> int:
        count = 1
        for size in self.shape[1:]:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensors by name, the header's __metadata__) of one safetensors file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise SafetensorsError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise SafetensorsError(f"{path}: the header does not parse ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}, not one this reader knows")
        begin, stop = info["data_offsets"]
        tensors[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
        end = max(end, stop)
    size = path.stat().st_size
    if size < 8 + length + end:
        raise SafetensorsError(f"{path} is truncated: its header describes {8 + length + end} bytes, the file has "
                               f"{size}")
    return tensors, metadata


class SafetensorsFolder:
    """The tensors of a checkpoint folder's safetensors files, read a row range at a time."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = sorted({self.folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"{self.folder} has no safetensors files")
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            tensors, _ = read_header(path)
            for name, entry in tensors.items():
                if name in self.entries:
                    raise SafetensorsError(f"{self.folder}: tensor {name} is in two files")
                self.entries[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.folder} has no tensor {name}") from None

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) (dimension 0) of tensor `name`, in its stored dtype, as a new CPU tensor."""
        entry = self.entry(name)
        if not entry.shape:  # a 0-d tensor: one row
            if (start, stop) not in ((0, None), (0, 1)):
                raise SafetensorsError(f"{name} is 0-d: rows [{start}, {stop}) do not exist")
            out = torch.empty((), dtype=entry.dtype)
            _read_into(entry.file, entry.offset, out)
            return out
        rows = entry.shape[0]
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise SafetensorsError(f"{name} has {rows} rows: rows [{start}, {stop}) do not exist")
        out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
        _read_into(entry.file, entry.offset + start * entry.row_bytes, out)
        return out

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)


def _read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        done = 0
        while done < len(view):
            count = handle.readinto(view[done:])
            if not count:
                raise SafetensorsError(f"{path} ends inside a tensor (truncated)")
            done += count


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: what the header says of it."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def write_safetensors(path: str | os.PathLike[str], specs: Mapping[str, TensorSpec],
                      produce: Callable[[str], torch.Tensor | None], metadata: Mapping[str, str] | None = None,
                      write: bool = True) -> None:
    """Write the safetensors file of `specs` at `path`, asking `produce(name)` for each tensor in file order.

    `write=False`: only call `produce` in the same order (the ranks of a gather that do not write; they may
    return None). A produced tensor must match its spec (dtype and shape). The file is written under a
    temporary name and renamed when complete."""
    order = sorted(specs, key=lambda name: (_WRITE_ORDER[_NAMES[specs[name].dtype]], name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        spec = specs[name]
        size = torch.empty((), dtype=spec.dtype).element_size()
        for dim in spec.shape:
            size *= dim
        header[name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if not write:
        for name in order:
            produce(name)
        return
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name in order:
            tensor = produce(name)
            spec = specs[name]
            if tensor is None or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                got = None if tensor is None else (tensor.dtype, tuple(tensor.shape))
                raise SafetensorsError(f"writing {path}: {name} should be {spec.dtype} {spec.shape}, got {got}")
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.numel():
                handle.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    os.replace(temporary, path)


def shard_plan(specs: Mapping[str, TensorSpec], max_shard_size: int | str) -> tuple[dict[str, list[str]], bool]:
    """{file name: tensor names} as transformers' save_pretrained splits a state dict of these tensors (in
    this order) at `max_shard_size`, and whether that is more than one file (then it writes an index)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    stand_ins = {name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for name, spec in specs.items()}
    split = split_torch_state_dict_into_shards(stand_ins, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    return {file: list(names) for file, names in split.filename_to_tensors.items()}, split.is_sharded


def write_index(folder: Path, plan: Mapping[str, Iterable[str]], specs: Mapping[str, TensorSpec]) -> None:
    """model.safetensors.index.json of a save split over several files, as transformers writes it."""
    total_size = total_parameters = 0
    for spec in specs.values():
        count = 1
        for dim in spec.shape:
            count *= dim
        total_parameters += count
        total_size += count * torch.empty((), dtype=spec.dtype).element_size()
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": {name: file for file, names in plan.items() for name in names}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


__all__ = ["INDEX_FILE", "SafetensorsError", "SafetensorsFolder", "TensorEntry", "TensorSpec", "read_header",
           "shard_plan", "write_index", "write_safetensors"]
