"""A benchmark report (gptdeploy.app.bench.run_bench) for people: rich tables, and progress while it runs."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gptdeploy.app.bench_settings import FAILED, OK
from gptdeploy.progress import Progress as Lines

DASH = "—"


def _ms(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _mb(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def summary_lines(report: dict) -> list[str]:
    s, m, machine = report["settings"], report["model"], report["machine"]
    versions = " · ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "gptdeploy")
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "no GPU"
    loads = machine["load_average_start"], machine["load_average_end"]
    load = f"load average {loads[0][0]} at start, {loads[1][0]} at end" if all(loads) else ""
    bw = report["memory_bandwidth"]
    weights_mb = m["weight_bytes_per_decode_step"] / 1e6
    lines = [f"note: {note}" for note in report.get("notes", [])] + [
        f"gptdeploy {report['versions'].get('gptdeploy', '')} bench · {report['created']}",
        f"model: {m['source']} · {m['weights']} · {m['parameters'] / 1e6:.1f}M parameters · {m['precision']}",
        f"settings: prompt {s['prompt_len']} tokens · {s['new_tokens']} new tokens · batch "
        f"{', '.join(map(str, s['batches']))} · warm-up {s['warmup']}, {s['repeat']} repeats (medians) · "
        f"{s['threads']} threads · ONNX Runtime optimization {s['ort_optimization']}"
        f"{', huge pages' if s.get('huge_pages') else ''} · seed {s['seed']}",
        f"machine: {machine['cpu']} · {machine['physical_cores']} cores, {machine['logical_cpus']} logical CPUs · "
        f"{machine['memory_gib']} GiB · {gpus} · {load}",
        f"libraries: {versions} · Python {machine['python']}",
        f"memory read bandwidth: {bw['gb_per_s']:.1f} GB/s, the median of {len(bw['samples_gb_per_s'])} measurements "
        f"between the rounds ({min(bw['samples_gb_per_s'])} to {max(bw['samples_gb_per_s'])}; each the best of "
        f"{bw['repeats']} reads of {bw['array_mib']} MiB); a decode step reads "
        f"{weights_mb:.0f} MB of {m['precision']} weights: at least {weights_mb / bw['gb_per_s']:.1f} ms per step "
        f"(+ the KV cache)",
    ]
    if report["baseline"]:
        lines.append(f"baseline: {report['baseline']} (× = speedup over it: tokens/s ratio at the same batch)")
    return lines


def speed_table(report: dict) -> Table:
    base = report["baseline"] or "baseline"
    table = Table(title="Speed", title_justify="left")
    for header, justify in [("runtime", "left"), ("batch", "right"), ("prefill\nms", "right"),
                            ("prefill\ntok/s", "right"), ("decode ms\np50 / p90 / p99", "right"),
                            ("decode\ntok/s", "right"), ("first\ntoken ms", "right"), ("total\ns", "right"),
                            ("decode e2e\nms/token", "right"), (f"prefill\n× {base}", "right"),
                            (f"decode\n× {base}", "right"), (f"decode e2e\n× {base}", "right"),
                            ("bandwidth\nlimit", "right")]:
        table.add_column(header, justify=justify)
    for runtime in report["runtimes"]:
        if runtime["status"] != OK:
            style = "red" if runtime["status"] == FAILED else "yellow"
            table.add_row(runtime["runtime"], f"[{style}]{runtime['status']}[/]", *[DASH] * 11)
            continue
        for b in runtime["batches"]:
            d, floor = b["decode"], b["bandwidth_floor"]["fraction_of_limit"]
            table.add_row(
                runtime["runtime"], str(b["batch"]), _ms(b["prefill"]["latency_ms"]),
                _rate(b["prefill"]["tokens_per_s"]),
                f"{_ms(d['p50_ms'])} / {_ms(d['p90_ms'])} / {_ms(d['p99_ms'])}", _rate(d["tokens_per_s"]),
                _ms(b["generation"]["ttft_ms"]), _seconds(b["generation"]["total_s"]),
                _ms(b["generation"].get("decode_ms_per_token")),
                _times(b["speedup"]["prefill"]), _times(b["speedup"]["decode"]),
                _times(b["speedup"].get("decode_end_to_end")),
                DASH if floor is None else f"{floor:.0%} of {b['bandwidth_floor']['read_gb_per_s']:.0f} GB/s",
            )
    return table


def setup_table(report: dict) -> Table:
    table = Table(title="Set-up and memory", title_justify="left")
    for header in ["runtime", "runner", "threads", "load s", "export s", "session s", "engine s",
                   "process\nRSS MB", "set-up peak\nRSS MB", "run peak\nRSS MB", "run peak\nGPU MB"]:
        table.add_column(header, justify="left" if header in ("runtime", "runner") else "right")
    for runtime in report["runtimes"]:
        if runtime["status"] != OK:
            style = "red" if runtime["status"] == FAILED else "yellow"
            table.add_row(runtime["runtime"], f"[{style}]{runtime['status']} (below)[/]", *[DASH] * 9)
            continue
        setup, memory = runtime["setup"], runtime["memory"]
        export = _seconds(setup.get("export_s", setup.get("convert_s")))
        if setup.get("export_reused") or setup.get("convert_reused"):
            export += " (cached)"
        table.add_row(
            runtime["runtime"], escape(runtime["runner"]), str(runtime["threads"] or DASH),
            _seconds(setup.get("load_s")), export, _seconds(setup.get("session_s")),
            _seconds(setup.get("engine_build_s")),
            _mb(memory["process_rss_mb"]), _mb(memory["setup_peak_rss_mb"]), _mb(memory["run_peak_rss_mb"]),
            _mb(memory["run_peak_gpu_mb"]),
        )
    return table


FOOTNOTES = [
    "decode: the new tokens after the first, one step each with the KV cache; first token and total: "
    "gptdeploy's generate, greedy; decode e2e: (total - first token) / (new tokens - 1), the loop's own work "
    "included. ct2 and llama.cpp: their own generation loops (greedy, no early stop) for all of these; their "
    "export column is the conversion of the same weights.",
    "bandwidth limit: (weights + KV cache at the mean past length) / the read bandwidth, over the p50 decode "
    "step; 100% would be a step at the memory-bandwidth limit (CPU runtimes only).",
    "process RSS: before set-up (interpreter and libraries); peaks: during set-up, and during the "
    "measurements; each runtime in its own process. The runtimes take turns, round by round.",
]


REPORT_WIDTH = 160  # when the output is not a terminal (a file, a pipe): wide enough for the tables


def print_report(report: dict, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=REPORT_WIDTH)
    for line in summary_lines(report):
        console.print(escape(line), highlight=False)
    console.print(speed_table(report))
    console.print(setup_table(report))
    for note in FOOTNOTES:
        console.print(f"[dim]{note}[/]", highlight=False)
    for runtime in report["runtimes"]:
        if runtime["status"] != OK:
            console.print(escape(f"{runtime['runtime']}: {runtime['status']}: {runtime['reason']}"), highlight=False,
                          soft_wrap=True)


class BenchProgress:
    """run_bench's progress on stderr: on a terminal a rich progress bar per step (bandwidth, export, each
    runtime); in a log, a line when each step starts and one when it ends."""

    def __init__(self, lines: Lines | None = None):
        self.lines = lines or Lines()
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=self.lines.console,
                                  disable=not self.lines.interactive)
        self._tasks: dict[str, tuple] = {}  # name -> (task id, total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def start(self, name: str, total: int):
        if not self.lines.interactive:
            self.lines.note(f"bench: {name} ...")
        self._progress.start()  # on the first step, so that an error in the settings shows no bar
        task = self._progress.add_task(name, total=total)
        self._tasks[name] = task, total

        def update(text: str, advance: int) -> None:
            self._progress.update(task, description=f"{name}: {text}", advance=advance)

        return update

    def note(self, text: str) -> None:
        """A line of its own, above the bars (a fallback to random weights, say)."""
        self.lines.note(f"note: {text}")

    def finish(self, name: str, status: str) -> None:
        task, total = self._tasks[name]
        self._progress.update(task, description=f"{name}: {status}", completed=total)
        if not self.lines.interactive:
            self.lines.note(f"bench: {name}: {status}")
