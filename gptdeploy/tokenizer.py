"""Tokenizers: GPT-2 BPE (tiktoken, from a rank file shipped in the package) and nanoGPT's char-level.

Both have the same small interface: encode, decode, vocab_size, eot_id. Neither downloads anything
nor executes code from a file.
"""

from __future__ import annotations

import base64
import hashlib
import pickle
from importlib import resources
from pathlib import Path
from typing import Protocol

from gptdeploy.errors import GptDeployError

GPT2_RANKS_FILE = "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The pre-tokenization pattern of tiktoken's "gpt2" (r50k) encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # ids in [0, vocab_size) decode; a model's vocab may be padded beyond it
    eot_id: int | None  # end-of-text id, None when the vocabulary has none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes, for streaming: a character may be split across tokens."""
        ...


def gpt2_ranks_path() -> Path:
    return Path(str(resources.files("gptdeploy") / "data" / GPT2_RANKS_FILE))


def read_tiktoken_ranks(path: Path, expected_sha256: str | None) -> dict[bytes, int]:
    """Reads a rank file in tiktoken's format: one `base64(token) rank` per line."""
    data = path.read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise GptDeployError(f"{path} is corrupt: its sha256 is not {expected_sha256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class BPETokenizer:
    """GPT-2 byte-pair encoding through tiktoken."""

    name = "gpt2-bpe"

    def __init__(self, ranks_path: Path | None = None):
        import tiktoken

        path = ranks_path or gpt2_ranks_path()
        ranks = read_tiktoken_ranks(path, GPT2_RANKS_SHA256 if ranks_path is None else None)
        self.eot_id = len(ranks)  # 50256 for GPT-2
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: self.eot_id},
        )
        self.vocab_size = self._enc.n_vocab
        self.ranks_path = path

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """With allow_special, "<|endoftext|>" in the text becomes the end-of-text id."""
        return self._enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes, for streaming: a character may be split across tokens."""
        return self._enc.decode_bytes(list(ids))


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, str, int) and refuses anything that would import code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl must hold plain data")


class CharTokenizer:
    """nanoGPT's character-level tokenizer, from the `meta.pkl` its prepare.py writes."""

    name = "char"

    def __init__(self, stoi: dict[str, int], itos: dict[int, str]):
        self.stoi = stoi
        self.itos = itos
        self.vocab_size = len(itos)
        self.eot_id = None

    @classmethod
    def from_meta(cls, path: Path) -> CharTokenizer:
        try:
            with open(path, "rb") as f:
                meta = _PlainDataUnpickler(f).load()
            return cls(meta["stoi"], meta["itos"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise GptDeployError(f"{path} is not a nanoGPT meta.pkl with stoi/itos: {e}") from e

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise GptDeployError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")
