"""RepositoryAdmin: repository administration beside the data plane, with no gRPC in it.

It owns the model Repository (serve/admin/repository.py): the initial load, the
--poll-interval poller (serve/admin/reload.py), RepositoryIndex, and the loads and
unloads clients request. The data plane (serve/dataplane/plane.py) only looks
models up in the repository; it never changes it.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from rnnserve.serve.admin.reload import RepositoryPoller
from rnnserve.serve.admin.repository import READY, Repository
from rnnserve.serve.engine.runtime import choose_providers
from rnnserve.serve.errors import Unavailable
from rnnserve.serve.settings import ServeSettings
from rnnserve.serve.wire.types import RepositoryEntry

log = logging.getLogger(__name__)


class RepositoryAdmin:
    def __init__(self, settings: ServeSettings, metrics=None):
        """metrics: the server's serve.metrics.Metrics (it watches the repository), or None."""
        self.settings = settings
        self.metrics = metrics
        self.requested_providers: list[str] = []
        self.poller: RepositoryPoller | None = None
        self._repo: Repository | None = None
        self._closed = False
        # Loads and unloads requested over gRPC run here, not on the handler thread: the model
        # threads they start inherit the starter's CPU priority (serve/frontend/priority.py). Its
        # thread is started now, from the thread that makes the admin.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnserve-admin")
        self._executor.submit(lambda: None).result()

    def load(self) -> None:
        """Load and warm every model; raises DeviceError (an Unavailable) if --device cannot be honoured."""
        t0 = time.perf_counter()
        self.requested_providers = choose_providers(self.settings.device)
        repo = Repository(self.settings, self.requested_providers, self.metrics)
        if self.metrics is not None:
            self.metrics.watch(repo)
        self._repo = repo
        repo.load_all()
        entries = repo.entries()
        providers = {p for e in entries if e.engine is not None for p in e.engine.inst.providers}
        log.info("repository %s: %d of %d model versions READY in %.2f s; active providers: %s",
                 self.settings.repository, sum(e.state == READY for e in entries), len(entries),
                 time.perf_counter() - t0, ", ".join(sorted(providers)) or "none")
        if self.settings.model_control_mode == "poll":
            self.poller = RepositoryPoller(repo.poll, self.settings.poll_seconds).start()

    @property
    def repository(self) -> Repository:
        """The loaded repository; Unavailable before load() and after close()."""
        if self._repo is None or self._closed:
            raise Unavailable("the server is not ready: models are not loaded" if not self._closed
                              else "the server is shutting down")
        return self._repo

    @property
    def loaded(self) -> bool:
        return self._repo is not None and not self._closed

    def repository_index(self) -> list[RepositoryEntry]:
        return [RepositoryEntry(e.name, e.version, e.state, e.reason) for e in self.repository.entries()]

    def load_model(self, name: str) -> None:
        """Reload every version of the model from disk (NotFound if its folder is gone). A version that
        fails keeps its previously loaded file serving, if it had one; the reason is in the index."""
        repo = self.repository
        self._executor.submit(repo.load_model, name).result()

    def unload_model(self, name: str) -> None:
        repo = self.repository
        self._executor.submit(repo.unload_model, name).result()

    def close(self) -> None:
        """Stop polling and unload every model (queued work runs first)."""
        self._closed = True
        self._executor.shutdown(wait=False)
        if self.poller is not None:
            self.poller.stop()
        if self._repo is not None:
            self._repo.close()
