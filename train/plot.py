"""loss.png: train and validation loss curves from the metrics.jsonl events."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def plot_losses(events: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    val = [(e["step"], e["val_nats"]) for e in events if e.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train (nats/char)", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (nats/char)", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy, nats/char")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote %s", path)
