"""loss.png: train and validation loss curves from the metrics.jsonl events.

Short runs have few points, so every point is marked when there are few, the
step axis has integer ticks, and the final whole-split validation loss is drawn
as its own point with its value, so even a one-minute run gives a readable plot.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

FEW_POINTS = 40  # below this, mark each point


def plot_losses(events: list[dict[str, Any]], path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    val = [(e["step"], e["val_nats"]) for e in events if e.get("event") == "eval"]
    final = [(e["checkpoint_step"], e["val_full_nats"]) for e in events if e.get("event") == "final"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), ".-" if len(train) < FEW_POINTS else "-", label="train (nats/char)",
                linewidth=1, markersize=4)
    if val:
        ax.plot(*zip(*val), "o-", label="validation, sampled windows (nats/char)", markersize=4)
    if final:
        step, nats = final[-1]
        ax.plot([step], [nats], "*", markersize=14, zorder=1,
                label=f"best checkpoint, whole validation split: {nats:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy, nats/char")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote %s", path)
