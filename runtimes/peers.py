"""The engines users would pick instead of gptdeploy, run through their own generation loops.

    engine = LlamaCppEngine.open(Path("model-q4_0.gguf"), threads=2)
    for token in engine.greedy(prompt_ids, new_tokens=128):   # yields each new token id as it is chosen
        ...

They are baselines for `gptdeploy bench`, not runners: neither exposes one step of a KV-cached forward
pass for a batch (CTranslate2 has no such call; llama-cpp-python's is for one sequence), so gptdeploy's
generate() and parity cannot drive them. What is timed is each engine's own loop, the way its users
run it: greedy, a fixed number of new tokens, end-of-text not stopping it, the prompt given as ids.
The files they run are made by gptdeploy.exporters.peers from the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gptdeploy.errors import GptDeployError


class PeerEngine:
    """One model opened in another engine: greedy(prompt_ids, new_tokens) and what it is."""

    name = ""

    @classmethod
    def open(cls, path: Path, threads: int) -> PeerEngine:
        raise NotImplementedError

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> Iterator[int]:
        """The new token ids, one at a time as the engine's own loop chooses them (argmax, no early stop)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LlamaCppEngine(PeerEngine):
    """llama.cpp through llama-cpp-python: Llama.generate with greedy sampling (top_k 1, temperature 0, no
    repetition penalty), the model state reset before each generation (no prompt reuse between runs)."""

    name = "llama.cpp"

    def __init__(self, llama, path: Path, threads: int):
        self.llama, self.path, self.threads = llama, path, threads

    @classmethod
    def open(cls, path: Path, threads: int) -> LlamaCppEngine:
        import llama_cpp

        # n_ctx 0: the model's own context; a prompt of up to 512 tokens is one batch (llama.cpp's default)
        llama = llama_cpp.Llama(str(path), n_ctx=0, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                n_gpu_layers=0, seed=0, verbose=False)
        return cls(llama, path, threads)

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> Iterator[int]:
        self.llama.reset()
        tokens = self.llama.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True)
        for count, token in enumerate(tokens, start=1):
            yield int(token)
            if count == new_tokens:
                tokens.close()
                return

    def describe(self) -> dict:
        import llama_cpp

        context = self.llama.context_params
        kv_types = {int(getattr(llama_cpp, n)): n.removeprefix("GGML_TYPE_").lower()
                    for n in dir(llama_cpp) if n.startswith("GGML_TYPE_") and isinstance(getattr(llama_cpp, n), int)}
        return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "file": self.path.name,
                "kv_cache": {"keys": kv_types.get(int(context.type_k), str(context.type_k)),
                             "values": kv_types.get(int(context.type_v), str(context.type_v))},
                "threads": self.threads, "loop": "Llama.generate (top_k 1, temp 0, repeat_penalty 1)"}

    def close(self) -> None:
        if self.llama is not None:
            self.llama.close()
            self.llama = None


class Ct2Engine(PeerEngine):
    """CTranslate2's Generator.generate_tokens with sampling_topk 1 (greedy), no end token, the prompt as
    the vocabulary's token strings (what CTranslate2 takes), compute type from the model's weights."""

    name = "ct2"

    def __init__(self, generator, path: Path, threads: int, vocabulary: list[str]):
        self.generator, self.path, self.threads, self.vocabulary = generator, path, threads, vocabulary

    @classmethod
    def open(cls, path: Path, threads: int) -> Ct2Engine:
        import ctranslate2

        vocabulary = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
        generator = ctranslate2.Generator(str(path), device="cpu", compute_type="default", inter_threads=1,
                                          intra_threads=threads)
        return cls(generator, path, threads, vocabulary)

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> Iterator[int]:
        if max(prompt_ids) >= len(self.vocabulary):
            raise GptDeployError(f"token id {max(prompt_ids)} is outside CTranslate2's vocabulary of "
                                 f"{len(self.vocabulary)}")
        prompt = [self.vocabulary[i] for i in prompt_ids]
        for step in self.generator.generate_tokens(prompt, max_length=new_tokens, min_length=new_tokens,
                                                   sampling_topk=1, end_token=[]):
            yield int(step.token_id)

    def describe(self) -> dict:
        import ctranslate2

        config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        compute = self.generator.compute_type
        # the KV cache is kept in the activations' type: float32 unless the compute type names float16/bfloat16
        kv = next((t for t in ("float16", "bfloat16") if t in compute), "float32")
        return {"engine": f"CTranslate2 {ctranslate2.__version__}", "compute_type": compute,
                "kv_cache": {"keys": kv, "values": kv}, "threads": self.threads,
                "loop": "Generator.generate_tokens (sampling_topk 1, no end token)",
                "model_spec": config.get("model_spec_name") or config.get("architecture")}

    def close(self) -> None:
        if self.generator is not None:
            self.generator.unload_model()
            self.generator = None
