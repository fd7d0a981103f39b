"""Trains the `shakespeare` preset: a small GPT on tinyshakespeare, on CPU, in under half an hour.

    python scripts/train_shakespeare.py path/to/tinyshakespeare.txt

The data is char-rnn's tinyshakespeare (about 1.1 MB of Shakespeare's plays, public domain). As in
nanoGPT's data/shakespeare/prepare.py, the first 90% of the characters train and the last 10%
validate, each part tokenized on its own with the GPT-2 tokenizer. The loop follows nanoGPT's
train.py: AdamW with linear warmup and cosine decay, gradient clipping, a fixed number of iterations,
everything seeded. The architecture is the preset's (gptdeploy/presets.py); dropout is on only here.

Writes safetensors (fp16) with the architecture and the training record in its metadata, which
`gptdeploy.load` reads; by default to gptdeploy/data/shakespeare.safetensors, the preset's weights.
Progress goes to stderr, the training record (losses in nats per token) to stdout as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptdeploy.model import GPT, GPTConfig
from gptdeploy.presets import PRESETS
from gptdeploy.tokenizer import BPETokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "gptdeploy" / "data" / "shakespeare.safetensors"


@dataclass
class Settings:
    seed: int = 1337
    max_iters: int = 1000
    batch_size: int = 8  # sequences of the preset's block_size (256) tokens
    learning_rate: float = 1.5e-3
    min_lr: float = 1.5e-4  # the end of the cosine decay, at max_iters
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # nanoGPT's choice for small Shakespeare models, which see few tokens per step
    grad_clip: float = 1.0
    dropout: float = 0.1  # the data is small: dropout keeps the model from memorising it
    eval_interval: int = 100
    eval_batches: int = 8  # batches per split for the loss estimates during training


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the rest validates."""
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val` of token frequencies counted on `train`, add-one smoothed."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[val].mean().item()


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([data[i : i + block_size] for i in starts])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in starts])
    return x, y


def lr_at(it: int, s: Settings) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < s.warmup_iters:
        return s.learning_rate * (it + 1) / s.warmup_iters
    progress = (it - s.warmup_iters) / max(1, s.max_iters - s.warmup_iters)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (s.learning_rate - s.min_lr)


def make_optimizer(model: GPT, s: Settings) -> torch.optim.AdamW:
    """nanoGPT's groups: weight decay on matrices and embeddings, none on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2))


@torch.no_grad()
def estimate_loss(model: GPT, data: torch.Tensor, s: Settings, seed: int) -> float:
    """Mean loss over `eval_batches` random batches; the same batches at every call (fixed seed)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [model(*get_batch(data, s.batch_size, model.config.block_size, gen)).loss.item()
              for _ in range(s.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def split_loss(model: GPT, data: torch.Tensor, max_windows: int | None = None, seed: int = 0) -> float:
    """Loss (nats/token) over a split cut into consecutive windows of block_size tokens.

    All windows, or `max_windows` of them drawn with `seed` (the train split is 8x the validation one).
    """
    model.eval()
    T = model.config.block_size
    starts = list(range(0, len(data) - 1, T))
    if max_windows is not None and max_windows < len(starts):
        picks = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))[:max_windows]
        starts = [starts[i] for i in sorted(picks.tolist())]
    total, count = 0.0, 0
    for start in starts:
        end = min(start + T, len(data) - 1)
        total += model(data[start:end][None], data[start + 1 : end + 1][None]).loss.item() * (end - start)
        count += end - start
    return total / count


def fp16_roundtrip(model: GPT) -> GPT:
    """The model as the shipped file holds it: weights rounded to fp16, computing in fp32."""
    rounded = GPT(model.config)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return rounded.eval()


def save(model: GPT, config: GPTConfig, record: dict, out: Path) -> None:
    """fp16 safetensors; lm_head is tied to the token embedding, so only the embedding is stored."""
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    metadata = {
        "format": "pt",
        "gptdeploy.config": json.dumps(config.to_dict()),
        "gptdeploy.tokenizer": BPETokenizer.name,
        "gptdeploy.training": json.dumps(record),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(data_path: Path, out: Path, s: Settings) -> dict:
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    text = data_path.read_text(encoding="utf-8")
    train_text, val_text = split_text(text)
    tokenizer = BPETokenizer()
    train_ids = torch.tensor(tokenizer.encode(train_text, allow_special=False), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text, allow_special=False), dtype=torch.long)
    config = PRESETS["shakespeare"].config
    unigram = unigram_loss(train_ids, val_ids, config.vocab_size)
    log(f"train {len(train_text):,} chars = {len(train_ids):,} tokens, val {len(val_text):,} chars = "
        f"{len(val_ids):,} tokens; unigram val loss {unigram:.4f}")

    model = GPT(dataclasses.replace(config, dropout=s.dropout))
    model.init_weights(s.seed)
    model.train()
    log(f"model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
        f"{model.num_params():,} parameters; {torch.get_num_threads()} threads")
    optimizer = make_optimizer(model, s)
    batch_gen = torch.Generator().manual_seed(s.seed)
    curve, step_times = [], []
    for it in range(s.max_iters + 1):
        if it % s.eval_interval == 0 or it == s.max_iters:
            point = {"iter": it, "train": estimate_loss(model, train_ids, s, s.seed + 1),
                     "val": estimate_loss(model, val_ids, s, s.seed + 2)}
            curve.append(point)
            log(f"iter {it}: train loss {point['train']:.4f}, val loss {point['val']:.4f}")
        if it == s.max_iters:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, s)
        x, y = get_batch(train_ids, s.batch_size, config.block_size, batch_gen)
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        step_times.append(time.perf_counter() - t0)
        if it % 10 == 0:
            eta = statistics.median(step_times) * (s.max_iters - it - 1)
            log(f"iter {it}/{s.max_iters}: loss {loss.item():.4f}, lr {lr_at(it, s):.2e}, "
                f"{step_times[-1]:.2f} s/iter, about {eta / 60:.1f} min to go")
    train_seconds = time.perf_counter() - started

    log("final losses, with the weights rounded to fp16 as shipped ...")
    shipped = fp16_roundtrip(model)
    val_windows = math.ceil((len(val_ids) - 1) / config.block_size)
    record = {
        "data": {"train_chars": len(train_text), "val_chars": len(val_text),
                 "train_tokens": len(train_ids), "val_tokens": len(val_ids)},
        "settings": dataclasses.asdict(s),
        "parameters": model.num_params(),
        "tokens_seen": s.max_iters * s.batch_size * config.block_size,
        "train_seconds": round(train_seconds, 1),  # data preparation, training steps and estimates
        "median_seconds_per_iter": round(statistics.median(step_times), 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "curve": curve,
        "val_loss": split_loss(shipped, val_ids),  # the whole validation split
        "train_loss": split_loss(shipped, train_ids, max_windows=val_windows, seed=s.seed),  # as many windows
        "train_loss_windows": val_windows,
        "unigram_val_loss": unigram,
    }
    save(model, config, record, out)
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    log(f"wrote {out} ({out.stat().st_size:,} bytes): train loss {record['train_loss']:.4f}, "
        f"val loss {record['val_loss']:.4f} (unigram {unigram:.4f}) nats/token, {record['total_seconds']:.0f} s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="tinyshakespeare's input.txt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the weights ({DEFAULT_OUT.name})")
    for f in dataclasses.fields(Settings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help="(default: %(default)s)")
    args = parser.parse_args()
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    record = train(args.data, args.out, settings)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
