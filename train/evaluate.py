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

from rnnserve.cli import EXIT_INTERRUPTED, user_error
from rnnserve.train.checkpoint import CheckpointError, load_checkpoint
from rnnserve.train.data import CorpusError, encode, read_corpus, split_ids

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


def _val_ids(args) -> tuple[object, torch.Tensor]:
    """The model and the chosen split's ids; CheckpointError/CorpusError say what is wrong."""
    model, ckpt = load_checkpoint(args.checkpoint)
    text = read_corpus(args.corpus)
    try:
        ids = encode(text, ckpt["vocab"])
    except CorpusError as e:
        trained_on = ckpt["train_config"].get("corpus")
        raise CorpusError(f"the checkpoint's vocabulary does not match the corpus: {e} of {args.checkpoint} "
                          f"({len(ckpt['vocab'])} characters); evaluate on the text the model was trained on"
                          + (f" ({trained_on})" if trained_on else "")) from e
    train_ids, val_ids = split_ids(ids)
    return model, (val_ids if args.split == "val" else train_ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rnnserve.train.evaluate",
                                description="Validation loss of a char-LM checkpoint, in windows "
                                            "with the state reset per window.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by rnnserve-train --task charlm")
    p.add_argument("--corpus", required=True, help="the UTF-8 text the model was trained on")
    p.add_argument("--window", type=int, default=256,
                   help="characters per window; the state is reset for each window")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="val: the corpus's last 10%%; train: the first 90%%")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.window < 1:
        p.error("--window must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, ids = _val_ids(args)
        if len(ids) < 2:
            return user_error(f"the {args.split} split of {args.corpus} has {len(ids)} characters; "
                              "give a longer corpus")
        nats = evaluate_windows(model, ids, window=args.window, batch_size=args.batch_size)
    except (CheckpointError, CorpusError) as e:
        return user_error(str(e))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"{args.split}: {len(ids)} chars, window {args.window}: "
          f"{nats:.4f} nats/char, {to_bits(nats):.4f} bits/char")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
