"""`--report FILE.html` of `gptdeploy bench` and `gptdeploy parity`: the JSON report as a page of charts.

    html = bench_html(report)            # the dict that --json writes (gptdeploy.app.bench.run_bench)
    html = parity_html(report.to_dict())
    write_html(html, path)

The page is one self-contained file that works offline: inline SVG charts drawn by matplotlib (Agg,
its SVG backend; text as text), a little CSS, no script, nothing fetched. It is built from the report
dict after a round trip through JSON, so the page shows exactly what --json writes; the JSON itself
is embedded too (<script type="application/json" id="report-data">, data, never run).

Every plotted value is traceable: the SVG element that draws it (a bar, a whisker, a line) has an id
and data-* attributes: data-metric (its path in the runtime's JSON object, e.g. decode.p50_ms or
steps[].metrics.max_abs), data-runtime, data-batch where it applies, and data-value (the JSON value)
or data-values (a JSON list, one per step of a line). tests/test_html_report.py reads them back from the
page and compares them with the JSON report.

matplotlib is optional (the report extra); require_matplotlib() says what to install.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path

from gptdeploy.errors import GptDeployError
from gptdeploy.files import write_atomic

REPORT_EXTRA = "pip install 'gptdeploy[report]'"
OK = "ok"  # gptdeploy.app.bench_settings.OK, without importing the runtimes' registry


def require_matplotlib() -> None:
    """--report needs matplotlib: said in one line (exit 2) before a run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GptDeployError(f"--report needs matplotlib, in the report extra: {REPORT_EXTRA}") from None


def write_html(page: str, path: str | Path) -> None:
    """Written to a temporary file beside `path` and renamed: never a half-written page."""
    write_atomic(Path(path), page)


def _plain(report: dict) -> dict:
    """The report as --json writes it and a reader reads it back (tuples become lists, and so on)."""
    return json.loads(json.dumps(report))


# --- charts ---


class _Chart:
    """One matplotlib figure, rendered to an inline SVG whose data elements carry their values."""

    def __init__(self, name: str, rows: int = 1, cols: int = 1, width: float = 9.0, height: float = 4.0):
        from matplotlib.figure import Figure  # no pyplot: nothing global, and the backend is the SVG one

        self.name = name
        self.figure = Figure(figsize=(width, height), layout="constrained")
        self.axes = self.figure.subplots(rows, cols, squeeze=False).ravel().tolist()
        self._data: list[dict] = []

    def tag(self, artist, ident: str, **attributes) -> None:
        """Marks `artist` in the SVG: id `name-ident`, and data-KEY="VALUE" for each attribute (values as JSON)."""
        key = f"gptdeploy-datum-{len(self._data)}"
        artist.set_gid(key)
        self._data.append({"key": key, "id": _ident(f"{self.name}-{ident}"), **attributes})

    def svg(self) -> str:
        import matplotlib

        buffer = io.StringIO()
        # the salt makes clip-path ids repeatable and distinct between the page's charts
        with matplotlib.rc_context({"svg.hashsalt": f"gptdeploy-{self.name}", "svg.fonttype": "none",
                                    "svg.image_inline": True}):
            self.figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                                                  "Type": None})
        text = buffer.getvalue()
        text = text[text.index("<svg"):]  # no XML declaration nor DOCTYPE inside HTML
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
        # matplotlib's own ids (figure_1, axes_1, clip paths, markers) are per figure: prefixed, so that the
        # page's charts do not share one
        prefix = f"{self.name}-"

        def own(match: re.Match) -> str:
            ident = match.group(2)
            return match.group(0) if ident.startswith("gptdeploy-datum-") else \
                f"{match.group(1)}{prefix}{ident}{match.group(3)}"

        text = re.sub(r'(\bid=")([^"]+)(")', own, text)
        text = re.sub(r"(url\(#)([^)]+)(\))", own, text)
        text = re.sub(r'(href="#)([^"]+)(")', own, text)
        for datum in self._data:
            attributes = " ".join(f'data-{k}="{html.escape(_json(v))}"' for k, v in datum.items()
                                  if k not in ("key", "id"))
            text = text.replace(f'id="{datum["key"]}"', f'id="{datum["id"]}" class="datum" {attributes}', 1)
        return text.replace("<svg ", f'<svg id="chart-{self.name}" role="img" ', 1)


def _json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def _number(value) -> float:
    """A JSON metric as a float: NaN and Inf are strings in the JSON ("nan", "inf"), None is NaN."""
    if value is None:
        return math.nan
    return float(value)


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


# --- the page ---

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       margin: 1.5em auto; max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: .8em 0; }
dl.header dt { font-weight: 600; color: #555; }
dl.header dd { margin: 0; }
figure { margin: .8em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption, .caption { color: #555; font-size: .92em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .2em .55em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f6; }
.pass { color: #137333; font-weight: 600; }
.fail { color: #b3261e; font-weight: 600; }
.note { background: #fff8e1; padding: .3em .6em; border-left: 3px solid #f0b400; }
ul.problems li { color: #b3261e; }
"""


def _page(title: str, header: list[tuple[str, str]], body: list[str], report: dict, kind: str) -> str:
    data = json.dumps(report, indent=1).replace("</", "<\\/")
    rows = "\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in header)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>",
        f'<body class="gptdeploy-{kind}-report">', f"<h1>{html.escape(title)}</h1>",
        f'<dl class="header" id="header">\n{rows}\n</dl>', *body,
        f'<script type="application/json" id="report-data">{data}</script>', "</body>", "</html>", "",
    ])


def _figure(chart: _Chart, heading: str, caption: str) -> str:
    return (f'<section id="section-{chart.name}"><h2>{html.escape(heading)}</h2><figure>{chart.svg()}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure></section>")


# --- gptdeploy bench ---


def _bench_rows(report: dict) -> list[tuple[dict, dict]]:
    """(runtime, batch) of every measured runtime, in the report's order."""
    return [(r, b) for r in report["runtimes"] if r["status"] == OK for b in r["batches"]]


def _row_label(runtime: dict, batch: dict, batches: int) -> str:
    return runtime["runtime"] if batches == 1 else f"{runtime['runtime']} · batch {batch['batch']}"


def _bench_header(report: dict) -> list[tuple[str, str]]:
    s, m, machine = report["settings"], report["model"], report["machine"]
    bw = report["memory_bandwidth"]
    start, end = machine["load_average_start"], machine["load_average_end"]

    def loads(values) -> str:
        return " / ".join(f"{v:.2f}" for v in values) if values else "unknown"

    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    rows = [("created", report["created"]),
            ("model", f"{m['source']} · {m['weights']} · {m['parameters'] / 1e6:.1f}M parameters · {m['precision']}"),
            ("runtimes", ", ".join(s["runtimes"])),
            ("settings", f"batch {', '.join(map(str, s['batches']))} · prompt {s['prompt_len']} tokens · "
                         f"{s['new_tokens']} new tokens · warm-up {s['warmup']}, {s['repeat']} timed repeats · "
                         f"{s['threads']} threads · ONNX Runtime optimization {s['ort_optimization']}"
                         f"{', huge pages' if s.get('huge_pages') else ''} · seed "
                         f"{s['seed']} · {'each runtime in its own process' if s['isolate'] else 'in one process'}"),
            ("machine", f"{machine['cpu']} · {machine['physical_cores']} cores, {machine['logical_cpus']} logical "
                        f"CPUs · {machine['memory_gib']} GiB · {gpus} · {machine['os']}"),
            ("load average", f"{loads(start)} at the start, {loads(end)} at the end (1, 5, 15 minutes)"),
            ("memory bandwidth", f"{bw['gb_per_s']:.1f} GB/s read (median of {len(bw['samples_gb_per_s'])} "
                                 f"measurements, {min(bw['samples_gb_per_s'])} to {max(bw['samples_gb_per_s'])})"),
            ("baseline", report["baseline"] or "none measured"),
            ("libraries", f"{versions} · Python {machine['python']}")]
    return rows


LOG_SPAN = 30  # a chart whose values span more than this factor gets a log axis: a slow outlier hides no bar


def _range(ax, low: float, high: float, margin: float) -> bool:
    """The value axis from 0 to high (and room for the labels), or a log axis when the values span a wide
    range. Returns whether it is log."""
    if low > 0 and high / low > LOG_SPAN:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.6, high * margin ** 4)
        return True
    ax.set_xlim(0, high * margin or 1)
    return False


OUTSIDE = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # a legend beside the axes


def _decode_chart(report: dict, rows) -> _Chart:
    """Decode ms per step: a bar at p50, a whisker to p90 and on to p99, the bandwidth floor as a line."""
    n_batches = len(report["settings"]["batches"])
    chart = _Chart("decode", height=1.2 + 0.42 * len(rows))
    ax = chart.axes[0]
    colors = dict(zip(report["settings"]["batches"], _colors(n_batches)))
    floor_drawn = False
    for y, (r, b) in enumerate(rows):
        d, who = b["decode"], dict(runtime=r["runtime"], batch=b["batch"])
        ident = f"{r['runtime']}-b{b['batch']}"
        first = n_batches > 1 and all(other["batch"] != b["batch"] for _, other in rows[:y])
        bar = ax.barh(y, d["p50_ms"], height=0.6, color=colors[b["batch"]], alpha=0.85,
                      label=f"batch {b['batch']}" if first else None)[0]
        chart.tag(bar, f"p50-{ident}", metric="decode.p50_ms", value=d["p50_ms"], **who)
        (p90,) = ax.plot([d["p50_ms"], d["p90_ms"]], [y, y], color="#222", lw=2.2, solid_capstyle="butt")
        chart.tag(p90, f"p90-{ident}", metric="decode.p90_ms", value=d["p90_ms"], **who)
        (p99,) = ax.plot([d["p90_ms"], d["p99_ms"], d["p99_ms"], d["p99_ms"]], [y, y, y - 0.18, y + 0.18],
                         color="#222", lw=1)
        chart.tag(p99, f"p99-{ident}", metric="decode.p99_ms", value=d["p99_ms"], **who)
        ax.annotate(f"{d['p50_ms']:.3g} ms", (d["p99_ms"], y), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=8, color="#333")
        floor = b["bandwidth_floor"]["floor_ms"]
        if floor is not None:
            (line,) = ax.plot([floor, floor], [y - 0.42, y + 0.42], color="#b3261e", lw=1.6, ls=(0, (3, 1.5)),
                              label=None if floor_drawn else "bandwidth floor")
            chart.tag(line, f"floor-{ident}", metric="bandwidth_floor.floor_ms", value=floor, **who)
            floor_drawn = True
    ax.set_yticks(range(len(rows)), [_row_label(r, b, n_batches) for r, b in rows])
    ax.invert_yaxis()
    lows = [b["decode"]["p50_ms"] for _, b in rows] + [b["bandwidth_floor"]["floor_ms"] for _, b in rows
                                                         if b["bandwidth_floor"]["floor_ms"] is not None]
    log = _range(ax, min(lows), max(b["decode"]["p99_ms"] for _, b in rows), 1.18)
    ax.set_xlabel("ms per decode step (bar: p50; whisker: thick to p90, thin to p99)" + (", log scale" if log else ""))
    ax.grid(axis="x", alpha=0.3)
    if n_batches > 1 or floor_drawn:
        ax.legend(**OUTSIDE)
    return chart


def _bars_chart(name: str, rows, values, label: str, fmt: str, n_batches: int, metric: str,
                reference: float | None = None) -> _Chart:
    chart = _Chart(name, height=1.2 + 0.36 * len(rows))
    ax = chart.axes[0]
    colors = _colors(max(n_batches, 1))
    batches = sorted({b["batch"] for _, b in rows})
    for y, ((r, b), value) in enumerate(zip(rows, values)):
        bar = ax.barh(y, value, height=0.6, color=colors[batches.index(b["batch"])], alpha=0.85)[0]
        chart.tag(bar, f"{r['runtime']}-b{b['batch']}", metric=metric, value=value, runtime=r["runtime"],
                  batch=b["batch"])
        ax.annotate(fmt.format(value), (value, y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8, color="#333")
    if reference is not None:
        ax.axvline(reference, color="#555", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [_row_label(r, b, n_batches) for r, b in rows])
    ax.invert_yaxis()
    log = _range(ax, min(values), max(values), 1.15)
    ax.set_xlabel(label + (", log scale" if log else ""))
    ax.grid(axis="x", alpha=0.3)
    return chart


def _speedup_chart(report: dict, rows) -> _Chart:
    n_batches = len(report["settings"]["batches"])
    chart = _Chart("speedup", height=1.4 + 0.5 * len(rows))
    ax = chart.axes[0]
    kinds = [("prefill", "#4c78a8"), ("decode", "#f58518"), ("generation", "#54a24b")]
    width = 0.26
    for y, (r, b) in enumerate(rows):
        for k, (kind, color) in enumerate(kinds):
            value = b["speedup"][kind]
            bar = ax.barh(y + (k - 1) * width, value, height=width * 0.92, color=color,
                          label=kind if y == 0 else None)[0]
            chart.tag(bar, f"{kind}-{r['runtime']}-b{b['batch']}", metric=f"speedup.{kind}", value=value,
                      runtime=r["runtime"], batch=b["batch"])
            ax.annotate(f"{value:.2f}×", (value, y + (k - 1) * width), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7, color="#333")
    ax.axvline(1.0, color="#555", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [_row_label(r, b, n_batches) for r, b in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"speedup over {report['baseline']} (tokens/s ratio at the same batch; 1× dashed)")
    ax.set_xlim(0, max(b["speedup"][k] for _, b in rows for k, _ in kinds) * 1.15)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(**OUTSIDE)
    return chart


MEMORY = [("process_rss_mb", "process RSS (before set-up)", "#9ecae9"),
          ("setup_peak_rss_mb", "set-up peak RSS", "#4c78a8"),
          ("run_peak_rss_mb", "run peak RSS", "#f58518"),
          ("run_peak_gpu_mb", "run peak GPU", "#54a24b")]


def _memory_chart(report: dict) -> _Chart:
    runtimes = [r for r in report["runtimes"] if r["status"] == OK]
    kinds = [k for k in MEMORY if any(r["memory"].get(k[0]) is not None for r in runtimes)]
    chart = _Chart("memory", height=1.4 + 0.22 * len(kinds) * len(runtimes))
    ax = chart.axes[0]
    width = 0.8 / len(kinds)
    top = 0.0
    for y, r in enumerate(runtimes):
        for k, (key, label, color) in enumerate(kinds):
            value = r["memory"].get(key)
            if value is None:
                continue
            offset = (k - (len(kinds) - 1) / 2) * width
            bar = ax.barh(y + offset, value, height=width * 0.92, color=color, label=label if y == 0 else None)[0]
            chart.tag(bar, f"{key}-{r['runtime']}", metric=f"memory.{key}", value=value, runtime=r["runtime"])
            ax.annotate(f"{value:,.0f}", (value, y + offset), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7, color="#333")
            top = max(top, value)
    ax.set_yticks(range(len(runtimes)), [r["runtime"] for r in runtimes])
    ax.invert_yaxis()
    ax.set_xlabel("MB (10^6 bytes)")
    ax.set_xlim(0, top * 1.15 or 1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(**OUTSIDE)
    return chart


def bench_html(report: dict) -> str:
    """The page of a `gptdeploy bench` report (the dict --json writes)."""
    report = _plain(report)
    rows = _bench_rows(report)
    n_batches = len(report["settings"]["batches"])
    body = [f'<p class="note">note: {html.escape(n)}</p>' for n in report.get("notes", [])]
    problems = [r for r in report["runtimes"] if r["status"] != OK]
    if problems:
        body.append('<ul class="problems" id="not-measured">' + "".join(
            f"<li>{html.escape(r['runtime'])}: {html.escape(r['status'])}: {html.escape(r.get('reason') or '')}</li>"
            for r in problems) + "</ul>")
    if not rows:
        body.append("<p>No runtime was measured.</p>")
        return _page(f"gptdeploy bench: {report['model']['source']}", _bench_header(report), body, report, "bench")
    base = report["baseline"]
    body += [
        _figure(_decode_chart(report, rows), "Decode: ms per step",
                "One decode step (a new token per row, with the KV cache): p50 as the bar, the whisker thick to p90 "
                "and thin to p99, over every step of every timed repeat. The red dashed line is the memory-bandwidth "
                "floor: the weights and the KV cache a step reads over the measured read bandwidth (CPU runtimes)."),
        _figure(_bars_chart("prefill", rows, [b["prefill"]["latency_ms"] for _, b in rows],
                            "prefill latency, ms (median)", "{:.3g} ms", n_batches, "prefill.latency_ms"),
                "Prefill latency",
                f"The prompt ({report['settings']['prompt_len']} tokens per row) from an empty cache: median "
                f"latency of the timed repeats."),
        _figure(_speedup_chart(report, rows), f"Speedup over {base}",
                f"Tokens/s over the baseline's ({base}) at the same batch size: prefill, decode, and whole "
                f"generations ({report['settings']['new_tokens']} new tokens)."),
        _figure(_memory_chart(report), "Peak memory",
                "Resident memory of each runtime's process: before set-up, the peak during set-up, the peak during "
                "the measurements" + ("" if report["settings"]["isolate"] else
                                      " (all runtimes in one process: each figure includes the others')") + "."),
    ]
    return _page(f"gptdeploy bench: {report['model']['source']}", _bench_header(report), body, report, "bench")


# --- gptdeploy parity ---


def _label(runtime: dict) -> str:
    return f"{runtime['runtime']} {runtime['variant'] or runtime['precision']}"


def _log_floor(values: list[float]) -> float:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return min(positive) / 10 if positive else 1e-9


def _error_chart(report: dict) -> _Chart:
    """max_abs and max_rel per step, per runtime, each against its tolerance (dashed, the runtime's color)."""
    runtimes = report["runtimes"]
    chart = _Chart("errors", cols=2, width=10, height=4.2)
    colors = _colors(len(runtimes))
    for ax, metric, title in zip(chart.axes, ("max_abs", "max_rel"),
                                 ("max |logits − reference|", "max relative error")):
        every = [_number(s["metrics"][metric]) for r in runtimes for s in r["steps"]]
        every += [_number(r["tolerances"].get(metric)) for r in runtimes]
        floor = _log_floor(every)
        for i, (r, color) in enumerate(zip(runtimes, colors)):
            steps = [s["step"] for s in r["steps"]]
            values = [_number(s["metrics"][metric]) for s in r["steps"]]
            shown = [max(v, floor) if math.isfinite(v) else math.nan for v in values]
            (line,) = ax.plot(range(len(steps)), shown, marker="o", ms=4, color=color, label=_label(r))
            chart.tag(line, f"{metric}-{i}", metric=f"steps[].metrics.{metric}", runtime=_label(r), index=i,
                      steps=steps, values=[s["metrics"][metric] for s in r["steps"]])
            tolerance = r["tolerances"].get(metric)
            if tolerance is not None:
                tol = ax.axhline(max(tolerance, floor), color=color, lw=1, ls="--", alpha=0.8)
                chart.tag(tol, f"tol-{metric}-{i}", metric=f"tolerances.{metric}", runtime=_label(r), index=i,
                          value=tolerance)
        ax.set_yscale("log")
        ax.set_xticks(range(len(runtimes[0]["steps"])), [s["step"] for s in runtimes[0]["steps"]], rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    chart.axes[0].legend(fontsize=8, loc="best")
    return chart


def _agreement_chart(report: dict) -> _Chart:
    """Top-1 and top-5 agreement per step, per runtime, against the tolerance."""
    runtimes = report["runtimes"]
    chart = _Chart("agreement", cols=2, width=10, height=3.8)
    colors = _colors(len(runtimes))
    for ax, metric, title in zip(chart.axes, ("top1", "top5"),
                                 ("top-1 agreement (same top token)", "top-5 agreement (overlap of the top 5)")):
        low = 1.0
        for i, (r, color) in enumerate(zip(runtimes, colors)):
            steps = [s["step"] for s in r["steps"]]
            values = [_number(s["metrics"][metric]) for s in r["steps"]]
            (line,) = ax.plot(range(len(steps)), [v * 100 for v in values], marker="o", ms=4, color=color,
                              label=_label(r))
            chart.tag(line, f"{metric}-{i}", metric=f"steps[].metrics.{metric}", runtime=_label(r), index=i,
                      steps=steps, values=[s["metrics"][metric] for s in r["steps"]])
            tolerance = r["tolerances"].get(metric)
            if tolerance is not None:
                tol = ax.axhline(tolerance * 100, color=color, lw=1, ls="--", alpha=0.8)
                chart.tag(tol, f"tol-{metric}-{i}", metric=f"tolerances.{metric}", runtime=_label(r), index=i,
                          value=tolerance)
                low = min(low, tolerance)
            low = min([low, *(v for v in values if math.isfinite(v))])
        ax.set_ylim(max(0.0, low * 100 - (100 - low * 100) * 0.3 - 0.5), 100.5)
        ax.set_xticks(range(len(runtimes[0]["steps"])), [s["step"] for s in runtimes[0]["steps"]], rotation=30,
                      ha="right", fontsize=8)
        ax.set_ylabel("% of positions")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    chart.axes[0].legend(fontsize=8, loc="lower left")
    return chart


def _greedy_chart(report: dict) -> _Chart | None:
    """Per runtime and prompt: how many greedy tokens agree with the reference's before the first divergence."""
    runtimes = [r for r in report["runtimes"] if r["greedy"]]
    if not runtimes:
        return None
    prompts = len(report["inputs"]["prompts"])
    chart = _Chart("greedy", height=1.3 + 0.2 * prompts * len(runtimes))
    ax = chart.axes[0]
    colors = _colors(len(report["runtimes"]))
    width = 0.8 / prompts
    tokens = max(r["greedy"]["tokens"] for r in runtimes)
    for i, r in enumerate(report["runtimes"]):
        if not r["greedy"]:
            continue
        for p, (agreeing, divergence) in enumerate(zip(r["greedy"]["agreeing"], r["greedy"]["first_divergence"])):
            y = i + (p - (prompts - 1) / 2) * width
            bar = ax.barh(y, agreeing, height=width * 0.9, color=colors[i], alpha=0.9 if divergence else 0.45)[0]
            chart.tag(bar, f"{i}-prompt{p}", metric=f"greedy.agreeing[{p}]", runtime=_label(r), index=i, prompt=p,
                      value=agreeing)
            text = (f"prompt {p}: diverges at token {divergence['token']} (reference {divergence['reference']}, "
                    f"runtime {divergence['runtime']})" if divergence else f"prompt {p}: all {agreeing} agree")
            ax.annotate(text, (agreeing, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7,
                        color="#b3261e" if divergence else "#333")
    ax.axvline(tokens, color="#555", lw=1, ls="--")
    ax.set_yticks(range(len(report["runtimes"])), [_label(r) for r in report["runtimes"]])
    ax.invert_yaxis()
    ax.set_xlim(0, tokens * 1.9)
    ax.set_xlabel(f"greedy tokens equal to the reference's before the first divergence (of {tokens}; dashed)")
    ax.grid(axis="x", alpha=0.3)
    return chart


def _format(metric: str, value) -> str:
    from gptdeploy.app.parity_report import format_value

    return format_value(metric, _number(value) if value is not None else None)


SUMMARY = [("max_abs", "max abs"), ("max_rel", "max rel"), ("top1", "top-1"), ("top5", "top-5"),
           ("greedy", "greedy")]


def _verdicts(report: dict) -> str:
    """A table: per runtime its verdict, and each summary metric over all steps against its tolerance."""
    head = "".join(f"<th>{html.escape(h)} (tolerance)</th>" for _, h in SUMMARY)
    rows = []
    for i, r in enumerate(report["runtimes"]):
        checks = {c["metric"]: c for c in r["checks"]}
        cells = []
        for metric, _ in SUMMARY:
            c = checks.get(metric)
            if c is None:
                cells.append("<td>-</td>")
                continue
            mark = "" if c["passed"] else ' class="fail"'
            tolerance = "" if c["tolerance"] is None else f" ({_format(metric, c['tolerance'])})"
            cells.append(f'<td{mark} data-metric="checks.{metric}" data-value="{html.escape(_json(c["value"]))}">'
                         f"{html.escape(_format(metric, c['value']) + tolerance)}</td>")
        verdict = '<span class="pass">PASS</span>' if r["passed"] else '<span class="fail">FAIL</span>'
        rows.append(f'<tr id="verdict-{i}" data-runtime="{html.escape(_label(r))}"><td>{html.escape(_label(r))}'
                    f"</td><td>{verdict}</td>{''.join(cells)}</tr>")
    failures = [f"<li>{html.escape(_label(r))}: {html.escape(c['message'])}</li>"
                for r in report["runtimes"] for c in r["checks"] if not c["passed"] and c.get("message")]
    return (f'<section id="section-verdicts"><h2>Verdicts</h2><table id="verdicts"><tr><th>runtime</th><th>verdict'
            f"</th>{head}</tr>{''.join(rows)}</table>"
            + (f'<ul class="problems">{"".join(failures)}</ul>' if failures else "")
            + '<p class="caption">Each value over every step of every case; greedy: the fraction of the greedy tokens '
              "generated before the first divergence, for the prompt that diverges first.</p></section>")


def parity_html(report: dict) -> str:
    """The page of a `gptdeploy parity` report (the dict --json writes: ParityReport.to_dict())."""
    report = _plain(report)
    inputs, ref = report["inputs"], report["reference"]
    header = [("created", report["created"]), ("source", report["source"]),
              ("reference", ref["description"]),
              ("runtimes", ", ".join(f"{_label(r)}: {r['description']}" for r in report["runtimes"])),
              ("inputs", f"{len(inputs['prompts'])} prompts, as one left-padded batch and each alone "
                         f"({len(inputs['cases'])} cases) · prefill and {inputs['steps']} decode steps · "
                         f"{inputs['greedy_tokens']} greedy tokens"),
              ("verdict", "PASS: every check passes" if report["passed"] else "FAIL: a check fails (below)"),
              ("gptdeploy", report["gptdeploy_version"])]
    body = [f'<p class="note">note: {html.escape(n)}</p>' for n in report.get("notes", [])]
    body.append(_verdicts(report))
    if report["runtimes"]:
        body.append(_figure(_error_chart(report), "Logits error per step",
                            "Per runtime, the largest absolute and relative difference of its logits from the "
                            "reference's, at each step (over every case's real positions); dashed: the runtime's "
                            "tolerance, in its color. Log scale; a value of 0 is drawn at the axis' floor."))
        body.append(_figure(_agreement_chart(report), "Top-1 and top-5 agreement per step",
                            "The share of positions whose top token is the reference's (top-1), and the overlap of "
                            "the five most likely tokens (top-5); dashed: the tolerance."))
        greedy = _greedy_chart(report)
        if greedy is not None:
            body.append(_figure(greedy, "Greedy generation",
                                "Each runtime generates greedily on its own from each prompt: the tokens equal to "
                                "the reference's before the first divergence; at a divergence, the token ids of the "
                                "reference and of the runtime (faded bar: all agree)."))
    return _page(f"gptdeploy parity: {report['source']}", header, body, report, "parity")
