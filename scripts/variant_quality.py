"""The quantized variants' quality on a whole held-out split: loss and top-1 agreement against fp32.

    python scripts/variant_quality.py FOLDER TEXT [--variants int8,q8,q4] [--split 0.9]

FOLDER: an fp32 export with its variants (gptdeploy export shakespeare --optimize). TEXT: the text the
model was trained on; its last (1 - split) by characters is the validation split, as nanoGPT and
scripts/train_shakespeare.py cut it (for the shakespeare preset: Tiny Shakespeare, 36,059 validation
tokens). Prints, per variant, the loss (nats per token) against the export's own fp32 graph, the
relative change, and how often its top-1 prediction agrees with fp32's; --json writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptdeploy.app.quality import window_loss
from gptdeploy.export_folder import read_export
from gptdeploy.runtimes.ort import OrtRunner
from gptdeploy.tokenizer import BPETokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--variants", default="int8,q8,q4")
    parser.add_argument("--split", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    ids = BPETokenizer().encode(text[int(len(text) * args.split):], allow_special=False)
    folder = read_export(args.folder)
    block_size = folder.config["block_size"]
    fp32_loss, fp32_top1 = window_loss(OrtRunner(folder), ids, block_size)
    rows = {"fp32": {"loss": fp32_loss, "tokens": len(ids)}}
    print(f"fp32: loss {fp32_loss:.4f} over {len(ids):,} tokens")
    for name in args.variants.split(","):
        entry = folder.variant(name)
        loss, top1 = window_loss(OrtRunner(folder, variant=name), ids, block_size)
        rows[name] = {"loss": loss, "relative": loss / fp32_loss - 1, "top1_agreement": float((top1 == fp32_top1).mean()),
                      "quantization": entry.get("quantization")}
        print(f"{name}: loss {loss:.4f} ({rows[name]['relative']:+.2%}), top-1 agreement "
              f"{rows[name]['top1_agreement']:.2%}  {entry.get('quantization') or ''}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
