"""A model's quality on held-out text, through any runner: next-token loss and top-1 predictions.

    loss, top1 = window_loss(OrtRunner(folder, variant="q4"), ids, block_size)

The text's token ids are cut into consecutive windows of block_size tokens (the last one shorter);
each window runs as one step from an empty cache with every position's logits, and each position is
scored on the token after it. Quantized variants are judged by their loss against the fp32 graph's and
by how often their top-1 prediction agrees with it (scripts/variant_quality.py, tests/test_optimize.py).
Needs numpy only.
"""

from __future__ import annotations

import numpy as np


def window_loss(runner, ids: list[int], block_size: int) -> tuple[float, np.ndarray]:
    """Mean next-token loss (nats per token) over `ids`, and the top-1 prediction at every scored position."""
    nll, predictions = [], []
    for start in range(0, len(ids) - 1, block_size):
        window = np.array([ids[start:start + block_size + 1]], dtype=np.int64)
        x, targets = window[:, :-1], window[0, 1:]
        logits = runner.step(x, np.ones_like(x), np.arange(x.shape[1])[None], runner.new_cache(1)).logits[0]
        logits = logits.astype(np.float64)
        top = logits.max(-1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
        nll.append(log_z - logits[np.arange(len(targets)), targets])
        predictions.append(logits.argmax(-1))
    return float(np.concatenate(nll).mean()), np.concatenate(predictions)
