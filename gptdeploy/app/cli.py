"""The `gptdeploy` command line: it parses, calls the application layer, and prints; nothing more.

`run` turns every outcome into an exit code (gptdeploy.errors lists them) and at most one line on
stderr: bad input or environment (GptDeployError) exit 2, a failed comparison or runtime 1, a bug 70
with a hint to set GPTDEPLOY_DEBUG=1 (which shows the traceback instead). Ctrl-C and SIGTERM unwind
the command the same way (nothing is left half-written) and print "gptdeploy: interrupted".
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from gptdeploy.environment import export_extra_problem
from gptdeploy.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, GptDeployError, RuntimeFailed
from gptdeploy.progress import Progress
from gptdeploy.runtimes.registry import RUNTIMES

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags as flags, SOURCE as SOURCE
    pretty_exceptions_enable=False,
    help="Take a GPT from PyTorch to ONNX, ONNX Runtime and TensorRT, and prove every runtime computes the same model.",
)

SourceArg = Annotated[str, typer.Argument(
    help="Preset name (gpt2, shakespeare, tiny, ...), Hugging Face folder, nanoGPT ckpt.pt or .safetensors file; "
         "generate, parity, bench and info also take an export folder.",
    metavar="SOURCE")]
RandomOpt = Annotated[bool, typer.Option("--random", help="Use the preset's architecture with random weights.",
                                         metavar="")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random weights.")]
HugePagesOpt = Annotated[bool, typer.Option(
    "--huge-pages", help="ONNX Runtime on the CPU: move the weights into huge pages once loaded (Linux 6.1+): "
                         "faster decode steps, slower to start (docs/cpu-speed.md).")]


@app.callback()
def _root():
    """Keeps typer in multi-command mode."""


@app.command()
def export(
    source: SourceArg = "gpt2",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Export folder. Default: ./NAME-onnx (./NAME-onnx-fp16 for fp16, ./NAME-random-onnx with "
                      "--random), NAME the preset or checkpoint's folder.",
        show_default=False)] = None,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 (LayerNorms and logits stay fp32).")] = "fp32",
    opset: Annotated[int | None, typer.Option(help="ONNX opset of the graphs.  [default: 18]", show_default=False)] = None,
    random: RandomOpt = False,
    seed: SeedOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export folder.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines into the folder (default "
                                      "profiles; gptdeploy build-engine DIR chooses others).")] = False,
    optimize: Annotated[bool, typer.Option("--optimize", help="Also write ONNX Runtime variants beside model.onnx "
                                           "(gptdeploy optimize; --variants picks them).")] = False,
    variants: Annotated[str | None, typer.Option(
        help="With --optimize: the variants, comma-separated, of fp32-fused, fp16, int8, q8, q4.  [default: "
             "all of them]", show_default=False)] = None,
    external_data: Annotated[bool | None, typer.Option(
        "--external-data/--inline",
        help="Weights in one file that the graphs share (onnx/model.onnx_data), or inside each graph.  [default: "
             "shared from 100 MB of weights]", show_default=False)] = None,
):
    """Export to an ONNX model folder (graphs with and without KV cache), validated in ONNX Runtime."""
    from gptdeploy.app.exporting import ensure_engines, export_model, optimize_export
    from gptdeploy.environment import import_tensorrt
    from gptdeploy.export_folder import check_destination, read_export
    from gptdeploy.exporters.onnx_export import DEFAULT_OPSET, check_opset, check_precision
    from gptdeploy.loading import load

    out = out or default_out_dir(source, precision, random)
    check_precision(precision)  # bad arguments fail before the model loads
    check_opset(DEFAULT_OPSET if opset is None else opset)
    check_destination(out.absolute(), force)
    chosen_variants = _check_optimize_options(optimize, variants, precision)
    if trt:
        import_tensorrt()  # what is missing, said before the export, not after it
    progress = Progress()
    loaded = load(source, weights="random" if random else None, seed=seed, progress=progress)
    result = export_model(loaded, out, precision=precision, opset=opset, force=force, external_data=external_data,
                          progress=progress)
    _print_export(source, out, result)
    if optimize:
        _print_variants(optimize_export(out, chosen_variants, reference=loaded.model, progress=progress))
    if trt:
        for name, entry in ensure_engines(read_export(out), progress=progress).engines.items():
            print(f"TensorRT {name} engine: {out / entry['file']}")


def default_out_dir(source: str, precision: str, random: bool = False) -> Path:
    """./NAME-onnx in the current folder (NAME-onnx-fp16 for fp16, NAME-random-onnx for random weights, which
    must not pass for the trained ones): NAME is the preset, or the folder of the checkpoint."""
    path = Path(source).expanduser()
    name = path.resolve().parent.name if path.is_file() else (path.resolve().name if path.exists() else source)
    return Path(f"{name}{'-random' if random else ''}-onnx" + ("-fp16" if precision == "fp16" else ""))


def _print_export(source: str, out: Path, result) -> None:
    v = result.validation
    files = ", ".join(result.manifest["files"]) + ", gptdeploy.json"
    checks = sum(len(g["checks"]) for g in v["graphs"].values())
    print(f"Wrote {out}/ ({result.size_bytes / 1e6:.1f} MB): {files}")
    print(f"Validated in ONNX Runtime (CPU) against {v['reference']}, {', '.join(v['graphs'])}: {checks} checks "
          f"passed; max |logits diff| {v['max_abs_diff']:.2g}, max relative {v['max_rel_diff']:.2g}, top-1 agreement "
          f"{v['top1_agreement']:.1%}")
    print(f"Exported {source} ({result.manifest['precision']}, opset {result.manifest['opset']}) in "
          f"{result.seconds:.1f} s")


def _check_optimize_options(optimize: bool, variants: str | None, precision: str) -> list[str] | None:
    from gptdeploy.exporters.ort_variants import DEFAULT_VARIANTS, check_variants

    if not optimize:
        if variants is not None:
            raise GptDeployError("--variants goes with --optimize")
        return None
    if precision != "fp32":
        raise GptDeployError("--optimize makes its variants (fp16 included) from an fp32 export; drop --precision")
    return check_variants(variants.split(",") if variants is not None else DEFAULT_VARIANTS)


def _print_variants(result) -> None:
    """One line per variant: file, size, what it holds, its validation."""
    for name, entry in result.folder.variants.items():
        if name not in result.written + result.kept:
            continue
        v = entry["validation"]
        fused = ", ".join(f"{op.rsplit('.', 1)[-1]} {n}" for op, n in entry["fused_operators"].items()) \
            or "standard ONNX operators"
        size = (result.folder.path / entry["file"]).stat().st_size / 1e6
        status = "kept (already there; --force makes it again)" if name in result.kept else "wrote"
        print(f"{name}: {status} {entry['file']} ({size:.0f} MB; {fused}); vs {v['reference']}: max |logits diff| "
              f"{v['max_abs_diff']:.2g}, max relative {v['max_rel_diff']:.2g}, cosine {v['cosine']:.6f}")
    if result.written:
        print(f"Optimized in {result.seconds:.1f} s")


@app.command()
def optimize(
    folder: Annotated[Path, typer.Argument(help="An fp32 export folder (gptdeploy export).")],
    variants: Annotated[str, typer.Option(
        help="Variants to write, comma-separated: fp32-fused (CPU), fp16 (CUDA), int8 (CPU), q8 (portable 8-bit, "
             "transformers.js' q8), q4 (CPU).")
    ] = "fp32-fused,fp16,int8,q8,q4",
    block_size: Annotated[int | None, typer.Option(help="int8 and q4: weights per quantization block (scale, zero "
                                                   "point).  [default: 128]", show_default=False)] = None,
    accuracy_level: Annotated[int | None, typer.Option(
        help="int8 and q4: MatMulNBits compute type on CPU: 4 int8 dot products (fastest), 1 fp32.  [default: 4]",
        show_default=False)] = None,
    symmetric: Annotated[bool | None, typer.Option(
        "--symmetric/--asymmetric", help="int8 and q4: without zero points, or with one per block.  [default: "
        "int8 symmetric, q4 asymmetric]", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write again the variants the folder holds.")] = False,
):
    """Add ONNX Runtime variants (fused, fp16, int8, q8, q4) beside onnx/model.onnx, each validated."""
    from gptdeploy.app.exporting import optimize_export
    from dataclasses import replace

    from gptdeploy.exporters.ort_variants import DEFAULT_QUANTIZATION, check_variants

    names = check_variants(variants.split(","))
    chosen = {"block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric}
    quantization = {name: replace(settings, **{k: v for k, v in chosen.items() if v is not None})
                    for name, settings in DEFAULT_QUANTIZATION.items()}
    _print_variants(optimize_export(folder, names, quantization=quantization, force=force, progress=Progress()))


def _range_opt(kind: str, point: str, what: str):
    return Annotated[int | None, typer.Option(f"--{point}-{kind}", help=f"{point} {what}.", show_default=False)]


@app.command("build-engine")
def build_engine(
    folder: Annotated[Path, typer.Argument(help="An export folder (gptdeploy export).")],
    precision: Annotated[str | None, typer.Option(
        help="fp32 or fp16: must be the export's (fp16 engines are built from an fp16 export).")] = None,
    min_batch: _range_opt("batch", "min", "rows per step (default 1)") = None,
    opt_batch: _range_opt("batch", "opt", "rows per step, tuned for (default 1)") = None,
    max_batch: _range_opt("batch", "max", "rows per step (default 8)") = None,
    min_seq: _range_opt("seq", "min", "prompt tokens (default 1)") = None,
    opt_seq: _range_opt("seq", "opt", "prompt tokens, tuned for (default block_size/8)") = None,
    max_seq: _range_opt("seq", "max", "prompt tokens (default block_size)") = None,
    min_past: _range_opt("past", "min", "cached positions before a decode step (default 1)") = None,
    opt_past: _range_opt("past", "opt", "cached positions, tuned for (default block_size/4)") = None,
    max_past: _range_opt("past", "max", "cached positions (default block_size - 1)") = None,
    workspace: Annotated[float | None, typer.Option(help="TensorRT workspace limit in GiB (default 4).",
                                                    show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the cached engines match.")] = False,
):
    """Build TensorRT engines into an export folder; cached ones are reused while they match."""
    from gptdeploy.app.exporting import ensure_engines
    from gptdeploy.engines import make_settings
    from gptdeploy.export_folder import read_export

    export_folder = read_export(folder)
    if precision not in (None, export_folder.precision):
        raise GptDeployError(f"{folder} is an {export_folder.precision} export; {precision} engines are built from "
                             f"an {precision} export (gptdeploy export SOURCE --precision {precision})")
    ranges = dict(batch=(min_batch, opt_batch, max_batch), sequence=(min_seq, opt_seq, max_seq),
                  past=(min_past, opt_past, max_past))
    given = workspace is not None or any(v is not None for r in ranges.values() for v in r)
    # no option: the settings the engines were last built with (or the defaults)
    settings = make_settings(export_folder.config["block_size"], **ranges, workspace_gib=workspace) if given else None
    export_folder = ensure_engines(export_folder, settings, force=force, progress=Progress())
    for name, entry in export_folder.engines.items():
        print(f"{name}: {export_folder.path / entry['file']} ({entry['bytes'] / 2**20:.1f} MiB; TensorRT "
              f"{entry['tensorrt']}, {entry['gpu']}, built {entry['built']} in {entry['build_seconds']} s)")


@app.command()
def verify(folder: Annotated[Path, typer.Argument(help="An export folder.")]):
    """Check every file of an export folder against its manifest (sizes, sha256, nothing unlisted).

    Exit code 0 when the folder matches its manifest, 1 when it does not (each difference on a line),
    2 when it is no export folder.
    """
    import time

    from gptdeploy.export_folder import differences, read_export

    start = time.perf_counter()
    export_folder = read_export(folder)
    found = differences(export_folder)
    files = export_folder.manifest["files"]
    size = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    for line in found:
        print(f"{folder}: {line}")
    if found:
        print(f"{folder} does not match its manifest: {len(found)} difference{'s' * (len(found) > 1)}")
        raise typer.Exit(EXIT_FAILED)
    print(f"{folder}: all {len(files)} files match the manifest ({size / 1e6:.1f} MB checked in "
          f"{time.perf_counter() - start:.2f} s)")


@app.command()
def web(
    folder: Annotated[Path, typer.Argument(help="An export folder (with tokenizer.json).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    assets: Annotated[Path | None, typer.Option(
        help="The page's folder, examples/web of a gptdeploy checkout after `npm install` there (the default "
             "when gptdeploy runs from a checkout).")] = None,
):
    """Serve an export folder and a page that runs it in the browser (transformers.js, WASM) on 127.0.0.1.

    Everything comes from this machine: the page, transformers.js and onnxruntime-web's WASM files (from
    examples/web/node_modules), the folder's graphs. Ctrl-C or SIGTERM stops the server (exit code 0).
    """
    from gptdeploy.app.web import open_site, serve

    if not 0 <= port <= 65535:  # a bad option is said first, before the folder and the page are looked at
        raise GptDeployError(f"--port {port} is not a port (0 to 65535)")
    site = open_site(folder, assets)

    def ready(url: str) -> None:
        print(f"Serving {folder} ({', '.join(site.dtypes())}) and the page from {site.assets}; Ctrl-C stops")
        print(url, flush=True)

    try:
        serve(site, port, ready)
    except Interrupted:
        print("Stopped.", flush=True)
        return EXIT_OK


@app.command()
def info(source: SourceArg = "gpt2", random: RandomOpt = False, seed: SeedOpt = 0):
    """Print the architecture, parameter count, tokenizer and where the weights came from; for an export
    folder, its manifest: source, precision, graphs, variants, engines, validation and sizes."""
    from rich.console import Console
    from rich.table import Table

    from gptdeploy.export_folder import is_export_folder, read_export

    table = Table(title=f"{source}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    if is_export_folder(source):
        rows = _export_rows(read_export(source))
    else:
        from gptdeploy.loading import load

        loaded = load(source, weights="random" if random else None, seed=seed, progress=Progress())
        rows = [*((k, str(v)) for k, v in loaded.config.to_dict().items()),
                ("parameters", f"{loaded.model.num_params():,}"),
                ("tokenizer", f"{loaded.tokenizer.name} ({loaded.tokenizer.vocab_size} tokens)"),
                ("weights", loaded.origin)]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _export_rows(folder) -> list[tuple[str, str]]:
    """An export folder's manifest, as the rows of `info`."""
    from gptdeploy.config import GPTConfig
    from gptdeploy.export_folder import data_files

    m = folder.manifest

    def size(relative) -> str:
        path = folder.path / relative
        return f"{path.stat().st_size / 1e6:,.1f} MB" if path.is_file() else "missing"

    config = GPTConfig.from_dict(m["config"])
    rows = [("export of", f"{folder.source.get('source')} ({folder.source.get('origin')})"),
            ("weights sha256", str(folder.source.get("sha256"))),
            ("architecture", f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context "
                             f"{config.block_size}, vocabulary {config.vocab_size}"),
            ("parameters", f"{config.num_params:,}"),
            ("precision", f"{m['precision']}, opset {m.get('opset')}"),
            ("tokenizer", f"{m['tokenizer']['type']} ({m['tokenizer'].get('vocab_size')} tokens), "
                          f"{m['tokenizer']['file']}"),
            ("created", f"{m.get('created')} by gptdeploy {m.get('gptdeploy_version')}")]
    for role, spec in m["graphs"].items():
        data = f", weights in {', '.join(data_files(spec))}" if data_files(spec) else ""
        rows.append((f"graph {role}", f"{spec['file']} ({size(spec['file'])}{data})"))
    for name, entry in folder.variants.items():
        rows.append((f"variant {name}", f"{entry['file']} ({size(entry['file'])}, {entry['precision']}, KV cache "
                                        f"{entry.get('kv_cache')})"))
    for name, entry in folder.engines.items():
        rows.append((f"engine {name}", f"{entry['file']} (TensorRT {entry.get('tensorrt')}, {entry.get('gpu')})"))
    v = m.get("validation", {})
    if v:
        rows.append(("validation", f"{'passed' if v.get('passed') else 'FAILED'} against {v.get('reference')}: max "
                                   f"|logits diff| {v.get('max_abs_diff', float('nan')):.2g}, max relative "
                                   f"{v.get('max_rel_diff', float('nan')):.2g}"))
    total = sum((folder.path / f).stat().st_size for f in m["files"] if (folder.path / f).is_file())
    rows.append(("files", f"{len(m['files'])} ({total / 1e6:,.1f} MB); gptdeploy verify {folder.path} checks them"))
    return rows


@app.command()
def generate(
    source: SourceArg = "gpt2",
    runtime: Annotated[str | None, typer.Option(
        help=f"One of {', '.join(RUNTIMES)} (default: ort for an export folder or a variant, torch otherwise).")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        help="Prompt text; repeat for a batch. Empty: start from end-of-text.", metavar="TEXT")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="The prompt as comma-separated token ids.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    greedy: Annotated[bool, typer.Option("--greedy", help="The most likely token at every step.")] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 1).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sample among the tokens that make up probability p.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: a fresh one, shown by --json).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print ids, text and timings as JSON.")] = False,
    precision: Annotated[str | None, typer.Option(
        help="torch: fp32, fp16, bf16; ONNX: the export's (fp32 or fp16), or int8, int4 (q4) for those variants.")
    ] = None,
    variant: Annotated[str | None, typer.Option(
        help="ort, ort-cuda: an ONNX Runtime variant of the export (fp32-fused, fp16, int8, q4; gptdeploy optimize).",
        show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help="torch: cpu or cuda[:N]; ort-cuda: cuda:N.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0: its default).")] = 0,
    huge_pages: HugePagesOpt = False,
    random: RandomOpt = False,
    weights_seed: Annotated[int, typer.Option(help="Seed of the random weights (--random).")] = 0,
):
    """Generate text from a prompt on any runtime; the text streams to stdout."""
    import time

    from gptdeploy.app.sources import open_runner

    prompts = _prompts(prompt, prompt_ids)
    config = _generation_config(max_new_tokens, greedy, temperature, top_k, top_p, seed)
    _check_threads(threads)
    _check_device(device)
    runtime = runtime or _default_runtime(source, precision, variant)
    start = time.perf_counter()
    runner, tokenizer = open_runner(runtime, source, precision=precision, variant=variant, device=device,
                                    threads=threads, huge_pages=huge_pages, weights="random" if random else None,
                                    weights_seed=weights_seed, progress=Progress())
    load_s = time.perf_counter() - start
    note = _random_weights_note(source, random, weights_seed)
    if json_output:
        _generate_json(source, runner, tokenizer, prompts, config, load_s)
    elif len(prompts) == 1:
        _generate_streaming(runner, tokenizer, prompts[0], config)
    else:
        _generate_batch(runner, tokenizer, prompts, config)
    if note:  # last: an error (a prompt too long, a NaN) stays the one line on stderr
        print(note, file=sys.stderr)


def _random_weights_note(source: str, random: bool, seed: int) -> str | None:
    """One line for stderr when the weights are random: their text means nothing."""
    from gptdeploy.export_folder import is_export_folder, read_export

    if random:
        return f"note: {source} has random weights (GPT-2's initialisation, seed {seed}): its text means nothing"
    if is_export_folder(source):
        recorded = read_export(source).source
        if recorded.get("random_seed") is not None or str(recorded.get("origin", "")).startswith("random weights"):
            return (f"note: {source} was exported from {recorded.get('source')} with {recorded.get('origin')}: its "
                    f"text means nothing")
    return None


def _prompts(prompt: list[str] | None, prompt_ids: str | None) -> list:
    if prompt and prompt_ids is not None:
        raise GptDeployError("give --prompt or --prompt-ids, not both")
    if prompt_ids is None:
        return prompt or [""]
    try:
        return [[int(i) for i in prompt_ids.split(",")]]
    except ValueError:
        raise GptDeployError(f"--prompt-ids takes comma-separated integers, not {prompt_ids!r}") from None


def _generation_config(max_new_tokens, greedy, temperature, top_k, top_p, seed):
    """The options as a GenerationConfig, checked before any model loads."""
    import secrets

    from gptdeploy.app.generation import GenerationConfig

    if greedy and (temperature, top_k, top_p) != (None, None, None):
        raise GptDeployError("--greedy takes no --temperature, --top-k or --top-p")
    config = GenerationConfig(max_new_tokens=max_new_tokens, greedy=greedy,
                              temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
                              seed=secrets.randbits(32) if seed is None and not greedy else seed)
    config.check()
    return config


def _default_runtime(source: str, precision: str | None, variant: str | None) -> str:
    """ort for an export folder or an ONNX Runtime variant, torch otherwise."""
    from gptdeploy.export_folder import is_export_folder
    from gptdeploy.precision import VARIANT_OF_PRECISION

    onnx_only = variant is not None or precision in VARIANT_OF_PRECISION
    return "ort" if is_export_folder(source) or onnx_only else "torch"


def _summary(result, runner) -> str:
    speed = f", {result.decode_tokens_per_s:.1f} tokens/s after the first" if result.decode_tokens_per_s else ""
    return (f"{result.steps} tokens in {result.prefill_s + result.decode_s:.2f} s (first after "
            f"{result.prefill_s:.3f} s{speed}) on {runner.describe()}")


def _generate_streaming(runner, tokenizer, prompt, config) -> None:
    """The prompt, then the text as it comes, on stdout; the summary on stderr."""
    from gptdeploy.app.generation import stream

    pieces = stream(runner, tokenizer, prompt, config)
    sys.stdout.write(prompt if isinstance(prompt, str) else tokenizer.decode(prompt))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    print(_summary(pieces.generation, runner), file=sys.stderr)


def _generate_batch(runner, tokenizer, prompts, config) -> None:
    from gptdeploy.app.generation import generate as run_generation

    result = run_generation(runner, tokenizer, prompts, config)
    for i, (ids, text) in enumerate(zip(result.prompt_ids, result.texts(tokenizer))):
        print(f"--- prompt {i} ---\n{tokenizer.decode(ids)}{text}")
    print(_summary(result, runner), file=sys.stderr)


def _generate_json(source, runner, tokenizer, prompts, config, load_s: float) -> None:
    import json

    from gptdeploy.app.generation import generate as run_generation

    result = run_generation(runner, tokenizer, prompts, config)
    rows = [{"prompt": tokenizer.decode(ids), "prompt_ids": ids, "generated_ids": new, "text": text,
             "finish_reason": reason}
            for ids, new, text, reason in zip(result.prompt_ids, result.new_ids, result.texts(tokenizer),
                                              result.finish_reasons)]
    print(json.dumps({
        "source": source, "runtime": runner.name, "runner": runner.describe(), "precision": runner.precision,
        "generation": {"max_new_tokens": config.max_new_tokens, "greedy": config.is_greedy,
                       "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                       "seed": config.seed},
        "outputs": rows,
        "timings": {"load_s": load_s, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
                    "decode_tokens_per_s": result.decode_tokens_per_s},
    }, indent=2, ensure_ascii=False))


@app.command()
def parity(
    source: SourceArg = "gpt2",
    runtimes: Annotated[str, typer.Option(
        help="Runtimes to check against the reference, comma-separated: torch, ort, ort-cuda, trt, ort-trt, ...")
    ] = "torch,ort",
    precision: Annotated[str | None, typer.Option(
        help="Their precisions, comma-separated: fp32, fp16, bf16 (torch), or an export's variant (int8, q4, "
             "fp32-fused); each runtime runs in each.  [default: fp32; an export folder's own]",
        show_default=False)] = None,
    reference: Annotated[str, typer.Option(help="The reference, RUNTIME[:PRECISION].")] = "torch:fp32",
    export: Annotated[Path | None, typer.Option(
        help="The export folder the checked ONNX runtimes run (the reference runs SOURCE).  [default: SOURCE "
             "exported into the export cache]",
        show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="A text file with one prompt per line.  [default: 4 built-in prompts]", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="Decode steps after the prefill, with the KV cache.")] = 8,
    greedy_tokens: Annotated[int, typer.Option(help="Tokens each runtime generates greedily on its own.")] = 32,
    tol: Annotated[list[str] | None, typer.Option(
        "--tol", help="METRIC=VALUE: a tolerance in place of the precision's default; repeatable. METRIC: max_abs, "
                      "mean_abs, max_rel, cosine, top1, flip_lead, top5, kv_max_abs, nonfinite, greedy.",
        show_default=False)] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON to this file.",
                                                   show_default=False)] = None,
    report_file: Annotated[Path | None, typer.Option(
        "--report", help="Write the report as a self-contained HTML page of charts to this file (needs matplotlib: "
                         "pip install 'gptdeploy[report]').", show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        help="Device of the checkpoint runtimes (torch): cpu or cuda[:N].  [default: cpu]",
        show_default=False)] = None,
    random: RandomOpt = False,
    seed: SeedOpt = 0,
):
    """Check that runtimes compute what the reference computes: logits, KV cache, greedy tokens.

    Exit code 0 when every check passes, 1 when any fails, 2 for bad input.
    """
    from dataclasses import replace

    from gptdeploy.app.parity_report import print_report
    from gptdeploy.app.parity_run import DEFAULT_PROMPTS, parse_reference, parse_targets, read_prompts, run_parity
    from gptdeploy.compare import parse_tolerances

    _check_device(device)
    targets = [replace(t, device=device) for t in parse_targets(runtimes, precision)]
    overrides = parse_tolerances(tol or [])
    if steps < 1 or greedy_tokens < 1:
        raise GptDeployError(f"--steps and --greedy-tokens must be >= 1, got {steps} and {greedy_tokens}")
    _check_output(json_file, "--json")
    _check_report(report_file)
    report = run_parity(source, targets, reference=parse_reference(reference), export=export,
                        prompts=read_prompts(prompts) if prompts else DEFAULT_PROMPTS, steps=steps,
                        greedy_tokens=greedy_tokens, tolerances=overrides,
                        weights="random" if random else None, weights_seed=seed, progress=Progress())
    print_report(report)
    data = report.to_dict()  # one dict for the JSON and the page, so that the two cannot disagree
    if json_file is not None:
        report.write_json(json_file, data)
    if report_file is not None:
        from gptdeploy.app.html_report import parity_html, write_html

        write_html(parity_html(data), report_file)
    if not report.passed:
        raise typer.Exit(1)


def _check_output(path: Path | None, option: str) -> None:
    """A report's destination, checked before a run that takes minutes: a file we can create or replace."""
    if path is None:
        return
    path = path.absolute()
    if path.is_dir():
        raise GptDeployError(f"{option} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise GptDeployError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GptDeployError(f"{option} {path}: not writable")


def _check_report(path: Path | None) -> None:
    """--report: a destination we can write, and matplotlib to draw with; both said before the run."""
    if path is not None:
        from gptdeploy.app.html_report import require_matplotlib

        _check_output(path, "--report")
        require_matplotlib()


def _check_threads(threads: int) -> None:
    cpus = os.cpu_count() or 1
    if threads < 0 or threads > cpus:
        raise GptDeployError(f"--threads {threads}: this machine has {cpus} logical CPUs; give 1 to {cpus}, or 0 for "
                             f"the runtime's default")


def _check_device(device: str | None) -> None:
    import re

    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise GptDeployError(f"--device {device!r}: give cpu, cuda or cuda:N")


def _int_list(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise GptDeployError(f"{option} takes comma-separated integers, like 1,8; not {text!r}") from None


@app.command()
def bench(
    source: SourceArg = "gpt2",
    runtime: Annotated[str, typer.Option(
        help="Runtimes to measure, comma-separated: hf, torch, ort, ort-cuda, trt, ort-trt; ort:VARIANT runs an ONNX "
             "Runtime variant (ort:q4).")] = "hf,torch,ort",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per row.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row (the first by the prefill).")] = 128,
    warmup: Annotated[int, typer.Option(help="Untimed rounds per batch size before the timed ones.")] = 1,
    repeat: Annotated[int, typer.Option(help="Timed rounds per batch size; figures are their medians.")] = 3,
    threads: Annotated[int, typer.Option(
        help="Intra-op threads of torch and ONNX Runtime.  [default: one per physical core]", show_default=False)] = 0,
    precision: Annotated[str | None, typer.Option(
        help="fp32, fp16 or bf16 (torch and hf; ONNX runtimes run fp32 or fp16 exports).  [default: fp32, or an "
             "export folder's own]", show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        help="torch and hf: cpu or cuda[:N]; the GPU of ort-cuda, trt and ort-trt.  [default: cuda when PyTorch "
             "sees a GPU, else cpu]", show_default=False)] = None,
    optimization: Annotated[str, typer.Option(
        help="ONNX Runtime graph optimization level: disable, basic, extended, all.")] = "all",
    variant: Annotated[str | None, typer.Option(
        help="ort and ort-cuda run each of these ONNX Runtime variants, comma-separated (export: the export's own "
             "graph), e.g. export,fp32-fused,int8,q4; a checkpoint's export gets them made once.",
        show_default=False)] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON to this file.",
                                                   show_default=False)] = None,
    report_file: Annotated[Path | None, typer.Option(
        "--report", help="Write the report as a self-contained HTML page of charts to this file (needs matplotlib: "
                         "pip install 'gptdeploy[report]').", show_default=False)] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Measure every runtime in this process instead of one process each: quicker to "
                             "start, but each runtime's memory then includes the others'.")] = False,
    huge_pages: Annotated[bool, typer.Option(
        "--huge-pages", help="The ort runtimes move their weights into huge pages once loaded (see generate "
                             "--huge-pages); the time it takes counts in their set-up.")] = False,
    random: RandomOpt = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and of the token ids fed.")] = 0,
):
    """Measure runtimes side by side: prefill, decode, time to first token, set-up and memory.

    Exit code 0 when every available runtime was measured (unavailable ones are listed with the
    reason), 1 when one failed, 2 for bad input.
    """
    from gptdeploy.app.bench import run_bench, write_json
    from gptdeploy.app.bench_report import BenchProgress, print_report
    from gptdeploy.app.bench_settings import FAILED, BenchSettings, expand_variants

    runtimes = expand_variants(tuple(r.strip() for r in runtime.split(",") if r.strip()), variant)
    settings = BenchSettings(
        source, runtimes, batches=_int_list("--batch", batch),
        prompt_len=prompt_len, new_tokens=new_tokens, warmup=warmup, repeat=repeat, threads=threads,
        precision=precision, device=device, ort_optimization=optimization, random_weights=random, seed=seed,
        isolate=not in_process, huge_pages=huge_pages,
    )
    settings.check()
    _check_threads(threads)
    _check_device(device)
    _check_output(json_file, "--json")
    _check_report(report_file)
    with BenchProgress() as progress:
        report = run_bench(settings, progress)
    print_report(report)
    if json_file is not None:
        write_json(report, json_file)
    if report_file is not None:
        from gptdeploy.app.html_report import bench_html, write_html

        write_html(bench_html(report), report_file)
    if any(r["status"] == FAILED for r in report["runtimes"]):
        raise typer.Exit(1)


NameOpt = Annotated[str | None, typer.Option(help="Name of the model in Triton.  [default: the preset or folder's "
                                                    "name]", show_default=False)]
InstancesOpt = Annotated[int, typer.Option(help="Model instances (each decodes its own batch).")]
MaxBatchOpt = Annotated[int, typer.Option("--max-batch", help="Rows a model instance decodes together (requests "
                                          "join and leave its batch at every step).")]
ThreadsOpt = Annotated[int, typer.Option(help="ONNX Runtime intra-op threads per model instance (0: one per core; 1 "
                                         "is quicker on a busy machine).")]


@app.command()
def triton(
    source: SourceArg = "gpt2",
    out: Annotated[Path, typer.Option("--out", help="The model repository to write.")] = Path("triton-repo"),
    variant: Annotated[str | None, typer.Option(help="An ONNX Runtime variant to run (fp32-fused, int8, q4, ...).",
                                                show_default=False)] = None,
    runtime: Annotated[str, typer.Option(help="ort (CPU), ort-cuda (GPU), trt (GPU; the step model with ONNX "
                                         "Runtime's TensorRT accelerator).")] = "ort",
    instances: InstancesOpt = 1,
    name: NameOpt = None,
    max_batch: MaxBatchOpt = 16,
    threads: ThreadsOpt = 0,
    huge_pages: HugePagesOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing repository.")] = False,
    random: RandomOpt = False,
    seed: SeedOpt = 0,
):
    """Write a Triton Inference Server model repository: a decoupled python-backend model that streams tokens,
    and the KV-cache step graph on the onnxruntime backend."""
    from gptdeploy.app.serving import export_of
    from gptdeploy.app.triton_repo import RepoSettings, write_repository

    settings = RepoSettings(name or _model_name(source), runtime, variant, instances, max_batch, threads, huge_pages)
    settings.check()
    if out.exists() and not force:
        raise GptDeployError(f"{out} exists; pass --force to replace it")
    folder = export_of(source, random=random, seed=seed, variant=variant, progress=Progress())
    repo = write_repository(folder, out, settings, force=force)
    print(f"Wrote {repo}/: {settings.name} (python backend, decoupled), {settings.name}_step (onnxruntime backend), "
          f"README.md")
    print(f"Serve it: docker run ... tritonserver --model-repository /models ({repo}/README.md), or "
          f"gptdeploy serve {source}")


@app.command()
def serve(
    source: SourceArg = "gpt2",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (KServe v2 and the generate extension).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    instances: InstancesOpt = 1,
    name: NameOpt = None,
    max_batch: MaxBatchOpt = 16,
    threads: ThreadsOpt = 0,
    huge_pages: HugePagesOpt = False,
    variant: Annotated[str | None, typer.Option(help="An ONNX Runtime variant to run.", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the Triton server's log.")] = False,
    random: RandomOpt = False,
    seed: SeedOpt = 0,
):
    """Serve a model with the Triton Inference Server on this machine (needs pip install 'gptdeploy[serve]').

    Ctrl-C or SIGTERM stops the server and its model processes (exit code 0).
    """
    from gptdeploy.app.serving import Ports, TritonServer, export_of, find_triton, served_repository
    from gptdeploy.app.triton_repo import RepoSettings
    from gptdeploy.files import deferred_signals

    settings = RepoSettings(name or _model_name(source), "ort", variant, instances, max_batch, threads, huge_pages)
    settings.check()
    ports = Ports(http_port, grpc_port, metrics_port)
    ports.check()
    find_triton()
    progress = Progress()
    repo = served_repository(export_of(source, random=random, seed=seed, variant=variant, progress=progress),
                             settings)
    log = (lambda line: print(line, file=sys.stderr)) if verbose else None
    server = TritonServer(repo, host, ports, models=[settings.name], log=log)
    try:
        with progress.step(f"Starting the Triton server on {repo}"):
            server.start()
        if server.note:
            print(server.note, file=sys.stderr)
        print(f"Serving {settings.name} with the Triton Inference Server (pid {server.process.pid})")
        print(f"  HTTP     {server.http_url}/v2/models/{settings.name}/generate (and generate_stream)")
        print(f"  gRPC     {server.grpc_url}")
        print(f"  metrics  {server.metrics_url} (Prometheus)")
        print(f"  try: curl -s {server.http_url}/v2/models/{settings.name}/generate "
              f"-d '{{\"text_input\": \"ROMEO:\", \"max_tokens\": 20}}'")
        print("Ctrl-C stops it.", flush=True)
        code = server.wait()
        raise RuntimeFailed(f"the Triton server exited on its own (exit code {code})")
    except Interrupted:
        with deferred_signals():
            server.stop()
        print("Stopped the Triton server.", flush=True)
        return EXIT_OK
    finally:
        with deferred_signals():
            server.stop()
            shutil.rmtree(repo, ignore_errors=True)  # this serve's own repository, in the cache


def _model_name(source: str) -> str:
    """A Triton model name from SOURCE: the preset, or the folder's name."""
    path = Path(source).expanduser()
    name = path.resolve().name if path.exists() else source
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return name or "model"


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (timeout, CI runners, docker stop): unwinds the command, so that nothing is
    left half-written. Not a KeyboardInterrupt, which typer would turn into a silent exit code."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """The command line: runs one command and exits with its code (gptdeploy.errors lists them)."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(argv: list[str]) -> int:
    """One command, every outcome turned into an exit code and at most one line on stderr."""
    debug = bool(os.environ.get("GPTDEPLOY_DEBUG"))
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        code = app(args=argv or ["--help"], prog_name="gptdeploy", standalone_mode=False)
        code = code if isinstance(code, int) else EXIT_OK
        _flush_stdout()
        return code
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted(EXIT_INTERRUPTED)
    except Interrupted as e:
        return _interrupted(EXIT_TERMINATED if e.signum == signal.SIGTERM else EXIT_INTERRUPTED)
    except typer.TyperException as e:  # a bad option or argument: its message, on one line
        if debug:
            raise
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        command = f"gptdeploy {argv[0]}" if argv and not argv[0].startswith("-") else "gptdeploy"
        return _error(f"{' '.join(message.split())} ({command} --help lists the options)", EXIT_BAD_INPUT)
    except GptDeployError as e:
        if debug:
            raise
        return _error(str(e), EXIT_BAD_INPUT)
    except RuntimeFailed as e:
        if debug:
            raise
        return _error(str(e), EXIT_FAILED, "failed")
    except BrokenPipeError:  # stdout closed early, e.g. `gptdeploy generate ... | head`
        _silence_stdout()
        return EXIT_FAILED
    except StdoutUnwritable as e:  # /dev/full, a full disk: what was printed is lost, said once
        _silence_stdout()
        return _error(f"cannot write to standard output: {e.strerror}", EXIT_BAD_INPUT)
    except OSError as e:
        if debug:
            raise
        return _error(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", EXIT_BAD_INPUT)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if debug:
            raise
        problem = export_extra_problem(e) if isinstance(e, ImportError) else None
        if problem is not None:  # the base install, asked to load a checkpoint or to export
            return _error(problem, EXIT_BAD_INPUT)
        first = str(e).splitlines()[0] if str(e) else ""
        return _error(f"internal error, {type(e).__name__}: {first} (a bug in gptdeploy; run again with "
                      f"GPTDEPLOY_DEBUG=1 to see the traceback)", EXIT_INTERNAL)
    finally:
        sys.stdout = stdout
        for s, handler in previous.items():
            signal.signal(s, handler)


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class StdoutUnwritable(OSError):
    """Writing to standard output failed (not a closed pipe)."""


class _Stdout:
    """sys.stdout while a command runs: a failed write says that it was standard output that failed."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutUnwritable(e.errno, e.strerror) from None

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _flush_stdout() -> None:
    sys.stdout.flush()


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's own flush at exit fails no second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _error(message: str, code: int, kind: str = "error") -> int:
    """The message on stderr, each of its lines (one per runtime that cannot run, say) as an error line."""
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
    for line in message.splitlines() or [""]:
        print(f"gptdeploy: {kind}: {line}", file=sys.stderr)
    return code


def _interrupted(code: int) -> int:
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()
    print("gptdeploy: interrupted", file=sys.stderr)
    return code
