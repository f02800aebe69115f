"""Where a batch runs: on the event loop or a scheduler thread, and on which onnxruntime session
of the model (the shared one, or one with more threads).

Quick runs: the event loop, ending a hold (Batcher.release(here=True)), runs the next batch
itself when QuickRuns says it takes onnxruntime at most the budget (--inline-run-us): the
least ns per row x step of the model's last runs, since a run's time also counts its wait
for the GIL after it whenever another thread holds it, times the batch's rows x steps.

Lone runs: a run of one request over at least LONE_MIN_STEPS steps, with nothing queued, no
other run in progress and recent runs of one row each (concurrency 1: the machine is idle but
for it), goes to the Batcher's `run_lone` when there is one: the same model on more threads
(ModelInstance.lone_session, taken only when no other model's run is in progress either),
which only pays on a run long enough to spread.

Wide runs: a run of at least WIDE_MIN_ROWS rows over at least LONE_MIN_STEPS steps (what many
concurrent callers of a sequence model make) goes to `run_wide` when there is one: the same
model on a session with more threads, which sleep between runs (ModelInstance.wide_session).
The rows split across the threads, so such a run takes about half as long on two, while fewer
rows gain too little to pay for the core the front end loses under that load.

Both rules read the batcher's state without its lock: a hint, never a correctness matter, since
every session runs the same graph (README "Lone runs", "Wide runs").
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

from rnnserve.serve.engine.modelio import ModelIO, Work

# Shorter lone or wide runs stay on the shared session: waking the extra threads costs more than they save.
LONE_MIN_STEPS = 16
# Fewer rows stay on the shared session: the concurrency that makes them leaves the front end busy,
# and a second thread gains least on few rows.
WIDE_MIN_ROWS = 8


def lone(io: ModelIO, live: Sequence[Work], queued: bool, running: int, recent_rows: Iterable[int]) -> bool:
    """A lone run: one request of one row long enough to spread over more threads, with nothing
    `queued`, no other run in progress (`running` counts this one) and recent runs of one row each."""
    if len(live) != 1 or live[0].rows != 1 or queued or running != 1:
        return False
    steps = io.time_len(live[0].inputs)
    return steps is not None and steps >= LONE_MIN_STEPS and max(recent_rows, default=1) <= 1


def wide(io: ModelIO, live: Sequence[Work]) -> bool:
    """A wide run: at least WIDE_MIN_ROWS rows over at least LONE_MIN_STEPS steps."""
    if sum(w.rows for w in live) < WIDE_MIN_ROWS:
        return False
    # seq_len is set for models whose batches may pad; in the others every item has the same length
    steps = max(w.seq_len for w in live) or io.time_len(live[0].inputs)
    return steps is not None and steps >= LONE_MIN_STEPS


class QuickRuns:
    """The run-time estimate of quick runs (above), from the runs it is told of (learn)."""

    RECENT = 8   # runs the estimate looks back on

    def __init__(self, budget_ns: int) -> None:
        self.budget_ns = budget_ns     # 0: never quick
        self._cell_ns: collections.deque[float] = collections.deque(maxlen=self.RECENT)
        self._last_cells = 0           # rows x steps of the last run

    def known(self) -> bool:
        """Some run has been timed (before any, no batch is quick)."""
        return bool(self._cell_ns)

    def fits(self, cells: int) -> bool:
        """A run of `cells` rows x steps is estimated within the budget."""
        return bool(self._cell_ns) and min(self._cell_ns) * cells <= self.budget_ns

    def last_fits(self) -> bool:
        """The last run was quick. Read without the Batcher's lock: a hint."""
        return self.fits(self._last_cells)

    def learn(self, live: Sequence[Work], compute_ns: int) -> None:
        """Record a run of the items `live` that took onnxruntime `compute_ns`."""
        rows = steps = 0
        for w in live:
            rows, steps = rows + w.rows, max(steps, w.seq_len)
        self._last_cells = rows * max(steps, 1)   # steps: 0 for a model without a time axis
        self._cell_ns.append(compute_ns / self._last_cells)
