"""--poll-interval: a thread that re-scans the model repository while the server runs.

Each pass calls Repository.poll() (serve/admin/repository.py): new models and versions are
loaded and warmed up before they serve, changed files are reloaded, removed ones are
retired after their in-flight work. A pass that fails (e.g. the repository folder is
gone for a moment) is logged and changes nothing; the next pass tries again.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from rnnserve.serve.errors import ServeError

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Calls `poll()` every `interval` seconds until stop()."""

    def __init__(self, poll: Callable[[], list[str]], interval: float):
        if interval <= 0:
            raise ValueError("the poll interval must be > 0 seconds")
        self._poll = poll
        self.interval = interval
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rnnserve-repository-poll", daemon=True)

    def start(self) -> RepositoryPoller:
        self._thread.start()
        log.info("polling the model repository every %.3g s", self.interval)
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                changed = self._poll()
            except ServeError as exc:   # e.g. the repository folder is gone for a moment
                log.error("polling the model repository failed (%s); keeping the loaded models", exc)
            except Exception:  # noqa: BLE001 - the server keeps serving what it has
                log.exception("polling the model repository failed; keeping the loaded models")
            else:
                if changed:
                    log.info("repository poll: %s changed", ", ".join(changed))
            self.passes += 1

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling; waits for a pass in progress (a model being loaded) up to `timeout`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
