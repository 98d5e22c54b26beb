"""Write a checkpoint in another project's layout: `python -m pipeline.export CHECKPOINT OUT --format F`.

Formats: `native` (ours, self-contained: the modeling code and an auto_map travel with the weights, so it
loads with `trust_remote_code=True` without this package), `apriel_h1` (ServiceNow's
`apriel_hybrid_ssm`) and `mambainllama` (MambaInLlama's served layout, what the qwerky-vllm-models vLLM
plugin loads). CHECKPOINT may be any checkpoint this project reads: ours, Apriel-H1, MambaInLlama, or a
plain Llama / Mistral / Qwen2 teacher (written as a hybrid with no Mamba layer). Tokenizer and
generation files are copied along. What a layout cannot express (identity layers, the head-aligned GQA
expansion, biases, ...) is refused in one line before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.model.layouts import LAYOUTS, LayoutError, load_pretrained, write_layout


def export(checkpoint: str | Path, out_dir: str | Path, layout: str) -> list[str]:
    """Load `checkpoint` (any readable layout) and write it to `out_dir` in `layout`; returns notes."""
    from pipeline.convert import ConversionError, hybridize
    from pipeline.model.modeling import HybridForCausalLM

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise LayoutError(f"{folder} is not a checkpoint folder (no config.json)")
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown format {layout!r}; valid: {', '.join(LAYOUTS)}")
    model = load_pretrained(folder)
    if not isinstance(model, HybridForCausalLM):
        try:
            model = hybridize(model, [])  # a teacher: the same decoder with every layer attention
        except ConversionError as error:
            raise LayoutError(str(error)) from None
    return write_layout(model, out_dir, layout, side_files_from=folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder (ours, Apriel-H1, MambaInLlama, or a teacher)")
    parser.add_argument("out", help="new folder to write")
    parser.add_argument("--format", required=True, choices=LAYOUTS, help="layout to write")
    args = parser.parse_args(argv)
    try:
        notes = export(args.checkpoint, args.out, args.format)
    except (LayoutError, ValueError, OSError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format})")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
