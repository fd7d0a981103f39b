"""The application layer: the only place that composes exporters with runtimes.

    from gptdeploy.app import open_runner, generate
    runner, tokenizer = open_runner("ort", "shakespeare")     # exported once into the export cache
    generate(runner, tokenizer, ["ROMEO:"]).texts(tokenizer)

It resolves a source into something a runtime runs (sources, export_cache, exporting, validation),
and holds generation, parity, bench and the command line. The layers below it (the core in
gptdeploy/, gptdeploy.exporters, gptdeploy.runtimes) never import it; docs/architecture.md says who
may import whom.
"""

_LAZY = {
    "open_runner": "gptdeploy.app.sources",
    "ExportCache": "gptdeploy.app.export_cache",
    "export_model": "gptdeploy.app.exporting",
    "optimize_export": "gptdeploy.app.exporting",
    "ensure_engines": "gptdeploy.app.exporting",
    "GenerationConfig": "gptdeploy.app.generation",
    "generate": "gptdeploy.app.generation",
    "stream": "gptdeploy.app.generation",
    "run_parity": "gptdeploy.app.parity_run",
    "Target": "gptdeploy.app.parity_run",
    "run_bench": "gptdeploy.app.bench",
    "BenchSettings": "gptdeploy.app.bench_settings",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptdeploy.app' has no attribute {name!r}")


__all__ = sorted(_LAZY)
