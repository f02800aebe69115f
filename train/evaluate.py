"""The quality metric: loss over a whole split in consecutive windows, state reset per window.

The split's ids x[0..N-1] give N-1 predictions (x[i] -> x[i+1]).  They are cut
into consecutive windows of `window` predictions: window k reads
x[kW .. kW+W-1] from a zero state and predicts x[kW+1 .. kW+W].  The last
window holds the remaining (N-1) mod W predictions.  Every character but the
first is predicted exactly once.  The result is the mean cross-entropy in
nats per character.

    python -m rnnserve.train.evaluate CKPT --corpus FILE [--window 256]
"""
from __future__ import annotations

import argparse
import logging
import math

import torch
import torch.nn.functional as F

from rnnserve.train.checkpoint import load_checkpoint
from rnnserve.train.data import encode, read_corpus, split_ids

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


def _sum_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    logits, _ = model(x)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                 reduction="sum"))


@torch.no_grad()
def evaluate_windows(model, ids: torch.Tensor, window: int = 256, batch_size: int = 64,
                     max_windows: int | None = None) -> float:
    """Mean nats/char over `ids` in consecutive windows, state reset for each window.

    `max_windows` limits the evaluation to that many full windows spread evenly
    over the split (a cheaper estimate for periodic evaluation during training);
    None means the whole split.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    n_pred = len(ids) - 1
    if n_pred < 1:
        raise ValueError("need at least 2 ids to evaluate")
    was_training = model.training
    model.eval()
    n_full = n_pred // window
    tail = n_pred - n_full * window
    # x windows: ids[kW : kW+W], y windows: ids[kW+1 : kW+W+1]
    xs = ids[: n_full * window].view(n_full, window)
    ys = ids[1: n_full * window + 1].view(n_full, window)
    if max_windows is not None and n_full > 0 and max_windows < n_full + (tail > 0):
        # An estimate: full windows spread evenly over the split, no tail.
        pick = torch.linspace(0, n_full - 1, max(1, min(max_windows, n_full))).round().long().unique()
        xs, ys, tail = xs[pick], ys[pick], 0
    total, count = 0.0, 0
    for i in range(0, len(xs), batch_size):
        total += _sum_loss(model, xs[i:i + batch_size], ys[i:i + batch_size])
    count += xs.numel()
    if tail:
        start = n_full * window
        total += _sum_loss(model, ids[start:start + tail][None], ids[start + 1:start + tail + 1][None])
        count += tail
    model.train(was_training)
    return total / count


def to_bits(nats: float) -> float:
    return nats / LN2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rnnserve.train.evaluate",
                                description="Validation loss of a char-LM checkpoint, in windows "
                                            "with the state reset per window.")
    p.add_argument("checkpoint")
    p.add_argument("--corpus", required=True, help="the UTF-8 text the model was trained on")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt = load_checkpoint(args.checkpoint)
    ids = encode(read_corpus(args.corpus), ckpt["vocab"])
    train_ids, val_ids = split_ids(ids)
    ids = val_ids if args.split == "val" else train_ids
    nats = evaluate_windows(model, ids, window=args.window, batch_size=args.batch_size)
    print(f"{args.split}: {len(ids)} chars, window {args.window}: "
          f"{nats:.4f} nats/char, {to_bits(nats):.4f} bits/char")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
