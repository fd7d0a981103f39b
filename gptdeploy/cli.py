"""The `gptdeploy` command line.

Every command raises GptDeployError for bad input; `main` turns it into one line on stderr and exit
code 2, so a user never sees a traceback for a mistake of theirs (GPTDEPLOY_DEBUG=1 shows it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from gptdeploy.errors import GptDeployError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Take a GPT from PyTorch to ONNX, ONNX Runtime and TensorRT, and prove every runtime computes the same model.",
)

SourceArg = Annotated[str, typer.Argument(help="Preset name (gpt2, tiny, ...), Hugging Face folder or nanoGPT ckpt.pt.")]
RandomOpt = Annotated[bool, typer.Option("--random", help="Use the preset's architecture with random weights.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random weights.")]


@app.callback()
def _root():
    """Keeps typer in multi-command mode."""


@app.command()
def export(
    source: SourceArg,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Export folder. Default: ./NAME-onnx (./NAME-onnx-fp16 for fp16), NAME the preset or checkpoint's folder.",
        show_default=False)] = None,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 (LayerNorms and logits stay fp32).")] = "fp32",
    opset: Annotated[int | None, typer.Option(help="ONNX opset of the graphs.  [default: 18]", show_default=False)] = None,
    random: RandomOpt = False,
    seed: SeedOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export folder.")] = False,
):
    """Export to an ONNX model folder (graphs with and without KV cache), validated in ONNX Runtime."""
    from exporters.onnx_export import (
        DEFAULT_OPSET, check_destination, check_opset, check_precision, default_out_dir, export_onnx,
    )
    from gptdeploy.loading import load

    out = out or default_out_dir(source, precision)
    check_precision(precision)  # bad arguments fail before the model loads
    check_opset(DEFAULT_OPSET if opset is None else opset)
    check_destination(out.absolute(), force)
    loaded = load(source, weights="random" if random else None, seed=seed)
    result = export_onnx(loaded, out, precision=precision, opset=opset, force=force)
    v = result.validation
    files = ", ".join(result.manifest["files"]) + ", gptdeploy.json"
    print(f"Wrote {out}/ ({result.size_bytes / 1e6:.1f} MB): {files}")
    print(f"Validated in ONNX Runtime (CPU) against the reference model over {len(v.checks)} checks (prefill, "
          f"{len(v.checks) - 2} decode steps, no-past graph): max |logits diff| {v.max_abs_diff:.2g} "
          f"(bound {v.bound:.2g}), top-1 agreement {v.top1_agreement:.1%}")
    print(f"Exported {source} ({precision}, opset {result.manifest['opset']}) in {result.seconds:.1f} s")


@app.command()
def info(source: SourceArg, random: RandomOpt = False, seed: SeedOpt = 0):
    """Print the architecture, parameter count, tokenizer and where the weights came from."""
    from rich.console import Console
    from rich.table import Table

    from gptdeploy.loading import load

    loaded = load(source, weights="random" if random else None, seed=seed)
    cfg = loaded.config
    table = Table(title=f"{source}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{loaded.model.num_params():,}")
    table.add_row("tokenizer", f"{loaded.tokenizer.name} ({loaded.tokenizer.vocab_size} tokens)")
    table.add_row("weights", loaded.origin)
    Console().print(table)


def main() -> None:
    try:
        app()
    except GptDeployError as e:
        if os.environ.get("GPTDEPLOY_DEBUG"):
            raise
        print(f"gptdeploy: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gptdeploy: interrupted", file=sys.stderr)
        sys.exit(130)
