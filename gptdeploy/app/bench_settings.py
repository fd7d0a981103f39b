"""What `gptdeploy bench` measures with: its settings, and the names of its runtimes (ort:q4).

Shared by gptdeploy.app.bench (the run) and gptdeploy.app.bench_worker (the processes it measures in).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptdeploy.errors import GptDeployError
from gptdeploy.export_folder import VARIANTS
from gptdeploy.precision import MODEL_PRECISIONS, canonical
from gptdeploy.runtimes.ort import OPTIMIZATION_LEVELS
from gptdeploy.runtimes.registry import PEERS, RUNTIMES

OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"


@dataclass(frozen=True)
class BenchSettings:
    source: str  # an export folder, or anything gptdeploy.load takes
    runtimes: tuple[str, ...]
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 128
    new_tokens: int = 128
    warmup: int = 1
    repeat: int = 3
    threads: int = 0  # intra-op threads of torch and ONNX Runtime; 0: the machine's physical cores
    precision: str | None = None  # None: fp32, or an export folder's own precision
    device: str | None = None  # torch and hf: None picks cuda when PyTorch sees a GPU, else cpu
    ort_optimization: str = "all"  # ONNX Runtime graph optimization level (runtimes.ort.OPTIMIZATION_LEVELS)
    random_weights: bool = False
    seed: int = 0  # seed of the random weights and of the token ids fed to every runtime
    isolate: bool = True  # each runtime in its own process (attributable memory); False: in this one
    bandwidth_mib: int = 512  # the array the read bandwidth is measured on: far larger than any cache
    huge_pages: bool = False  # the ort runtimes move their weights into huge pages (counted in their set-up)

    def check(self) -> None:
        if not self.runtimes:
            raise GptDeployError("no runtime given")
        unknown = [split_runtime(r)[0] for r in self.runtimes if split_runtime(r)[0] not in (*RUNTIMES, *PEERS)]
        if unknown:
            raise GptDeployError(f"unknown runtime {unknown[0]!r}; choose among {', '.join(RUNTIMES)}, or the other "
                                 f"engines {', '.join(PEERS)}")
        for name in self.runtimes:
            check_runtime_variant(name)
        if len(set(self.runtimes)) != len(self.runtimes):
            raise GptDeployError(f"a runtime is named twice in {','.join(self.runtimes)}")
        if not self.batches or min(self.batches) < 1:
            raise GptDeployError("batch sizes must be >= 1")
        if self.prompt_len < 1:
            raise GptDeployError(f"--prompt-len must be >= 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise GptDeployError(f"--new-tokens must be >= 2 (one from the prefill, the rest decode), "
                                 f"got {self.new_tokens}")
        if self.warmup < 0 or self.repeat < 1:
            raise GptDeployError("--warmup must be >= 0 and --repeat >= 1")
        if self.threads < 0:
            raise GptDeployError(f"--threads must be >= 0 (0: one per physical core), got {self.threads}")
        if self.precision is not None and canonical(self.precision) in ("int8", "int4"):
            raise GptDeployError(f"--precision {self.precision}: quantized weights are ONNX Runtime variants; measure "
                                 f"them with --variant int8,q4 (or --runtime ort:int8,ort:q4)")
        if self.precision is not None and canonical(self.precision) not in MODEL_PRECISIONS:
            raise GptDeployError(f"unknown precision {self.precision!r}; choose one of {', '.join(MODEL_PRECISIONS)}")
        if self.ort_optimization not in OPTIMIZATION_LEVELS:
            raise GptDeployError(f"unknown graph optimization level {self.ort_optimization!r}; choose one of "
                                 f"{', '.join(OPTIMIZATION_LEVELS)}")


def split_runtime(name: str) -> tuple[str, str | None]:
    """"ort:q4" -> ("ort", "q4"): a runtime, and the ONNX Runtime variant of the export it runs (or None);
    "llama.cpp:q4_0" -> ("llama.cpp", "q4_0"): another engine and its weight type."""
    runtime, _, variant = name.partition(":")
    return runtime, variant or None


def is_peer(name: str) -> bool:
    """Whether `name` (ENGINE or ENGINE:TYPE) is another engine than gptdeploy's (ct2, llama.cpp)."""
    return split_runtime(name)[0] in PEERS


def peer_type(name: str) -> str:
    """The weight type a peer engine runs: the one named, or its first (full precision)."""
    engine, weight_type = split_runtime(name)
    return weight_type or PEERS[engine].types[0]


def check_runtime_variant(name: str) -> None:
    """ort:q4 and the like: a variant that exists, for a runtime that runs variants."""
    runtime, variant = split_runtime(name)
    if variant is None:
        return
    if runtime in PEERS:
        if variant not in PEERS[runtime].types:
            raise GptDeployError(f"{name}: {runtime} runs {', '.join(PEERS[runtime].types)}, not {variant!r}")
        return
    if variant not in VARIANTS:
        raise GptDeployError(f"{name}: unknown variant {variant!r}; choose among {', '.join(VARIANTS)}")
    if not RUNTIMES[runtime].runs_variants:
        runs = ", ".join(n for n, spec in RUNTIMES.items() if spec.runs_variants)
        raise GptDeployError(f"{name}: variants are ONNX Runtime graphs, for {runs}")


def expand_variants(runtimes: tuple[str, ...], variants: str | None) -> tuple[str, ...]:
    """--variant V1,V2: each ort / ort-cuda runtime becomes RUNTIME:V1, RUNTIME:V2 ("export": the export's
    own graph, the runtime's plain name)."""
    if variants is None:
        return runtimes
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    if not chosen:
        raise GptDeployError("--variant names no variant")
    expanded = []
    for name in runtimes:
        if name not in RUNTIMES or not RUNTIMES[name].runs_variants:
            expanded.append(name)
            continue
        expanded += [name if v == "export" else f"{name}:{v}" for v in chosen]
    return tuple(expanded)
