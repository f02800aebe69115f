"""The model repository: loading what serve/admin/scan.py finds in DIR/<model>/<version>/.

Every version found is loaded; the
newest READY version answers requests that name no version, and older ones are
addressable by their version string. A version that fails to load (corrupt file,
bad metadata, graph not matching the metadata) is recorded as UNAVAILABLE with
the reason, and logged; the other models keep serving.

Changes while serving (`sync_model`, run by RepositoryModelLoad and, with
--poll-interval, by serve/admin/reload.py for every model folder):
- a new version folder is loaded and warmed up before it is published, so traffic
  switches to it only once it is READY; until then RepositoryIndex shows it LOADING;
- a changed model.onnx (its stat facts changed and its sha256 differs from the
  loaded file's) is reloaded the same way; the old instance keeps serving until
  the new one is READY and is then retired (ModelEngine.retire: in-flight work
  finishes on it first);
- a reload that fails keeps the previously loaded file serving (Triton's rule) and
  puts the failure in the reason; a new version that fails is UNAVAILABLE and the
  older READY versions keep answering unversioned requests;
- a removed version or model folder is retired and dropped (NOT_FOUND afterwards);
- a file that failed is retried when it changes (poll) or on an explicit load;
- a model unloaded by RepositoryModelUnload stays unloaded until the next explicit load.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import TypeGuard

from rnnserve.contract import KEY_FORMAT, MODEL_FILENAME, parse_metadata
from rnnserve.files import file_sha256
from rnnserve.serve.admin import modelconfig
from rnnserve.serve.admin.control import MAX_NAME_CHARS, model_dir, name_problem, require_explicit
from rnnserve.serve.admin.describe import describe, graph_tensors
from rnnserve.serve.admin.scan import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADED,
    ModelEntry,
    is_model_dir,
    scan_model,
    scan_names,
)
from rnnserve.serve.engine.model_engine import ModelEngine
from rnnserve.serve.engine.runtime import CPU, DeviceError, ModelInstance, create_session
from rnnserve.serve.errors import InvalidArgument, NotFound, Unavailable, quoted
from rnnserve.serve.settings import ServeSettings

log = logging.getLogger(__name__)



def _stat(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _config_of(path: str) -> str:
    """The model's config.pbtxt beside the version folders of REPO/<model>/<version>/model.onnx."""
    return modelconfig.config_path(os.path.dirname(os.path.dirname(path)))


def fingerprint(path: str) -> tuple[tuple[int, ...] | None, ...] | None:
    """(device, inode, size, mtime ns) of the model file and of its config.pbtxt; None if the model
    file is absent: a changed file changes it."""
    model = _stat(path)
    return None if model is None else (model, _stat(_config_of(path)))


def content_sha256(path: str) -> str:
    """sha256 of the model file, and of its config.pbtxt when there is one."""
    config = _config_of(path)
    return file_sha256(path) + (":" + file_sha256(config) if os.path.isfile(config) else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _engines(entries: Sequence[ModelEntry]) -> list[ModelEngine]:
    return [e.engine for e in entries if e.engine is not None]


def _serves(e: ModelEntry | None) -> TypeGuard[ModelEntry]:
    return e is not None and e.state == READY and e.engine is not None


def _newest(entries: Sequence[ModelEntry]) -> ModelEntry:
    """Where a request that names no version goes: the newest READY version, else the newest."""
    return next((e for e in reversed(entries) if e.state == READY), entries[-1])


def _unchanged(current: ModelEntry, found: ModelEntry) -> bool:
    """Nothing to load for this version: the same file as last time, or the same bytes as the
    loaded one (a touch, or a copy of the same file)."""
    if current.state in (LOADING, UNLOADED):
        return False
    now = fingerprint(found.path)
    if now == current.fingerprint:
        return True
    if _serves(current) and now is not None and current.sha256:
        try:
            same = content_sha256(found.path) == current.sha256
        except OSError:
            return False
        if same:
            current.fingerprint, current.reason = now, ""
        return same
    return False


def load_entry(entry: ModelEntry, settings: ServeSettings, providers: Sequence[str], metrics=None) -> None:
    """Open, check and warm one version; on failure record UNAVAILABLE + reason (DeviceError propagates).
    `metrics` (serve/metrics.py) gets the engine's batch numbers."""
    entry.fingerprint = fingerprint(entry.path)
    if entry.state == UNAVAILABLE:
        log.error("model %s: %s", entry.name, entry.reason)
        return
    try:
        if not os.path.isfile(entry.path):
            raise FileNotFoundError(f"missing {MODEL_FILENAME} in {os.path.dirname(entry.path)}")
        sha = content_sha256(entry.path)
        config = modelconfig.read_config(_config_of(entry.path))
        session = create_session(entry.path, providers, settings.device,
                                 settings.intra_op_threads, settings.inter_op_threads)
        props = session.get_modelmeta().custom_metadata_map
        meta = parse_metadata(props) if KEY_FORMAT in props else None   # a model of ours, or any other
        found = describe(graph_tensors(session.get_inputs()), graph_tensors(session.get_outputs()), meta,
                         config.proto if config is not None else None)
        # Lone and wide runs on more threads: CPU only (a GPU run's threads only feed the device), and
        # only for a model with a time axis (the Batcher's rules: such a run is long enough to spread).
        extra = any(t.time_axis is not None for t in found.spec.inputs) and session.get_providers()[0] == CPU
        lone = create_session(entry.path, providers, settings.device, settings.lone_threads,
                              settings.inter_op_threads, lone=True) if settings.lone_extra and extra else None
        wide = create_session(entry.path, providers, settings.device, settings.wide_threads,
                              settings.inter_op_threads) if settings.wide_extra and extra else None
        instance = ModelInstance(entry.name, entry.version, entry.path, session, found.spec, meta, found.source,
                                 allow_nonfinite=config is not None and config.allow_nonfinite, lone_session=lone,
                                 wide_session=wide)
        if settings.warmup:
            instance.warmup(settings.max_seq_len)
        engine = ModelEngine(instance, modelconfig.model_settings(config, settings), metrics)
    except DeviceError:
        raise
    except Exception as e:
        entry.state, entry.reason = UNAVAILABLE, f"failed to load {entry.path}: {_first_line(e)}"
        log.error("model %s version %s is UNAVAILABLE: %s", entry.name, entry.version, entry.reason)
        return
    entry.sha256 = sha
    entry.engine, entry.state, entry.reason = engine, READY, ""
    log.info("model %s version %s READY (providers %s); %s", entry.name, entry.version,
             ", ".join(instance.providers), found.summary())
    modelconfig.log_ignored(entry.name, config)


class Repository:
    """Thread-safe table name -> [ModelEntry], oldest version first."""

    def __init__(self, settings: ServeSettings, providers: Sequence[str], metrics=None):
        self.settings = settings
        self.providers = list(providers)
        self.metrics = metrics                  # serve/metrics.py Metrics, or None
        self._lock = threading.Lock()           # the table
        self._sync = threading.RLock()          # one load / unload / sync at a time
        self._models: dict[str, list[ModelEntry]] = {}
        # name -> the entry a request that names no version goes to (the newest READY one, else the
        # newest): read on every request, so derived once per change of the table (_index)
        self._default: dict[str, ModelEntry] = {}
        self._unloaded: set[str] = set()        # unloaded by request: polls leave them alone
        self._serving = False                   # after load_all a DeviceError only fails that version
        self._closed = False

    def load_all(self) -> None:
        """The initial load of every model folder; raises DeviceError if --device cannot be honoured."""
        self.poll()
        self._serving = True

    def poll(self) -> list[str]:
        """Bring every model in line with the repository folder; -> the names that changed.
        Raises Unavailable if the repository folder itself is gone (nothing is dropped then)."""
        on_disk = scan_names(self.settings.repository)
        with self._lock:
            known = list(self._models)
        return [name for name in sorted(set(on_disk) | set(known)) if self.sync_model(name)]

    def load_model(self, name: str) -> None:
        """RepositoryModelLoad: reload every version of one model from disk, unchanged and
        failed ones too; NotFound (after dropping it) if its folder is gone. Unavailable if a
        version failed (the others, and what that version served before, keep serving)."""
        require_explicit(self.settings.model_control_mode, "RepositoryModelLoad")
        model_dir(self.settings.repository, name)   # InvalidArgument unless one folder of the repository
        self.sync_model(name, force=True)
        failed = [e for e in self.entries(name) if e.state != READY or e.reason]
        if failed:
            raise Unavailable(f"model '{name}' did not load completely: " + "; ".join(
                f"version {e.version or '(none)'} is {e.state}: {e.reason}" for e in failed))

    def sync_model(self, name: str, force: bool = False) -> bool:
        """Load what is new or changed in DIR/<name>/, retire what is gone; True if anything changed."""
        root = self.settings.repository
        with self._sync:
            if self._closed:
                return False
            try:
                found = scan_model(root, name) if is_model_dir(root, name) else None
            except FileNotFoundError:   # removed while we looked
                found = None
            if found is None:
                dropped = self._drop(name)
                if force:
                    raise NotFound(f"model {quoted(name)} is not in the repository {root}")
                return dropped
            if name in self._unloaded and not force:
                return False
            self._unloaded.discard(name)
            with self._lock:
                current = {e.version: e for e in self._models.get(name, [])}
            slots = [(d, current.get(d.version)) for d in found]
            todo = [d for d, c in slots if force or c is None or not _unchanged(c, d)]
            loading = {id(d) for d in todo}
            on_disk = {d.version for d, _ in slots}
            gone = [c for v, c in current.items() if v not in on_disk]
            if not todo and not gone:
                return False
            # While loading, a version that serves keeps serving; a new one shows LOADING.
            self._publish(name, [c if _serves(c) or (c is not None and id(d) not in loading) else d
                                 for d, c in slots])
            for d in todo:
                self._load(d)
            final: list[ModelEntry] = []
            retired = [(c, "was removed from the repository") for c in gone]
            for d, c in slots:   # c is None only for a new version, which is in `loading`
                if c is not None and (id(d) not in loading or (d.state != READY and _serves(c))):
                    final.append(c)
                    if id(d) in loading:
                        c.fingerprint = d.fingerprint      # retried when the file changes again
                        c.reason = f"reload failed, still serving the previously loaded file: {d.reason}"
                        log.error("model %s version %s: %s", name, c.version, c.reason)
                else:
                    final.append(d)
                    if c is not None:
                        retired.append((c, "is replaced by the new file"))
            self._publish(name, final)
            engines = [(c.version, why, c.engine) for c, why in retired if c.engine is not None]
        for version, why, engine in engines:   # each closes once its in-flight work has finished
            log.info("model %s version %s %s; retiring the old instance", name, version, why)
            engine.retire()
        return True

    def _load(self, entry: ModelEntry) -> None:
        try:
            load_entry(entry, self.settings, self.providers, self.metrics)
        except DeviceError as e:
            if not self._serving:
                raise
            entry.state, entry.reason = UNAVAILABLE, f"failed to load {entry.path}: {e}"
            log.error("model %s version %s is UNAVAILABLE: %s", entry.name, entry.version, entry.reason)

    def _publish(self, name: str, entries: list[ModelEntry]) -> None:
        with self._lock:
            self._models[name] = entries
            self._index(name)

    def _index(self, name: str) -> None:
        """Derive _default[name] after the model's entries or their states changed; the caller
        holds self._lock. (A version turning READY while it loads is published right after.)"""
        entries = self._models.get(name)
        if not entries:
            self._default.pop(name, None)
            return
        self._default[name] = _newest(entries)

    def _drop(self, name: str) -> bool:
        """The model's folder is gone: forget it, retire its engines; True if it was known."""
        self._unloaded.discard(name)
        with self._lock:
            entries = self._models.pop(name, None)
            self._index(name)
        if entries is None:
            return False
        for engine in _engines(entries):
            engine.retire()
        log.info("model %s was removed from the repository; unloaded", name)
        return True

    def unload_model(self, name: str) -> None:
        require_explicit(self.settings.model_control_mode, "RepositoryModelUnload")
        if name_problem(name):
            model_dir(self.settings.repository, name)   # raises InvalidArgument
        with self._sync:
            with self._lock:
                entries = self._models.get(name)
                if entries is None:
                    raise NotFound(f"unknown model {quoted(name)}")
                old = _engines(entries)
                for e in entries:
                    e.engine, e.state, e.reason = None, UNLOADED, "unloaded by request"
                self._index(name)
            self._unloaded.add(name)
        # In-flight requests keep their own reference to the engine and finish first.
        for engine in old:
            engine.retire()
        log.info("model %s unloaded", name)

    def close(self) -> None:
        """Unload everything (after a load in progress); queued work runs first, then the threads stop."""
        with self._sync:
            self._closed = True
            with self._lock:
                engines = self._all_engines()
                for name in self._models:
                    for e in self._models[name]:
                        e.engine, e.state = None, UNLOADED
                    self._index(name)
        for engine in engines:
            engine.close()

    def inflight(self) -> int:
        """Work in flight on every loaded engine (ModelEngine.inflight)."""
        with self._lock:
            engines = self._all_engines()
        return sum(engine.inflight() for engine in engines)

    def release_memory(self) -> None:
        """Every loaded version hands its onnxruntime arena's free memory back (the Trimmer's hook)."""
        with self._lock:
            engines = self._all_engines()
        for engine in engines:
            engine.inst.release_memory()

    def _all_engines(self) -> list[ModelEngine]:
        """Every loaded version's engine; the caller holds self._lock."""
        return [x for entries in self._models.values() for x in _engines(entries)]

    def resolve(self, name: str, version: str = "") -> tuple[str, str, ModelEntry | None]:
        """(model, version, entry) of a request for its statistics: the version it goes to (the
        newest READY one when it names none); "" and None for what the repository does not know."""
        try:
            entry = self.entry(name, version)
            return name, entry.version, entry
        except NotFound:
            with self._lock:
                return (name, "", None) if name in self._models else ("", "", None)

    def gauges(self) -> list[tuple[str, str, str, int, int]]:
        """(model, version, state, live sequences, queued work items) of every entry."""
        out = []
        for e in self.entries():
            engine = e.engine
            live, queued = (engine.live_sequences(), engine.batcher.queue_depth()) if engine else (0, 0)
            out.append((e.name, e.version, e.state, live, queued))
        return out

    # -- lookups -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def entries(self, name: str = "") -> list[ModelEntry]:
        with self._lock:
            if name:
                return list(self._models.get(name, []))
            return [e for n in sorted(self._models) for e in self._models[n]]

    def ready_versions(self, name: str) -> list[str]:
        return [e.version for e in self.entry_list(name) if e.state == READY]

    def entry_list(self, name: str) -> list[ModelEntry]:
        with self._lock:
            entries = self._models.get(name)
            known = sorted(self._models) if entries is None else []
        if entries is None:
            raise NotFound(f"unknown model {quoted(name)}; models in the repository: {', '.join(known) or 'none'}")
        return list(entries)

    def entry(self, name: str, version: str = "") -> ModelEntry:
        """The entry for (name, version); version "" = the newest READY version. NotFound if unknown."""
        if not version:
            found = self._default.get(name)   # one dict read: atomic
            if found is not None:
                return found
        entries = self.entry_list(name)
        if version:
            for e in entries:
                if e.version == version:
                    return e
            have = ", ".join(e.version for e in entries if e.version) or "none"
            raise NotFound(f"model '{name}' has no version {quoted(version)}; versions: {have}")
        return _newest(entries)

    def get(self, name: str, version: str = "") -> ModelEngine:
        """The engine serving (name, version): NotFound if unknown, Unavailable if not READY;
        InvalidArgument for a name longer than any model name can be."""
        if len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"the model name has {len(name)} characters, over the limit of {MAX_NAME_CHARS}")
        e = self.entry(name, version)
        engine = e.engine
        if e.state != READY or engine is None:
            label = f"version {e.version} " if e.version else ""
            raise Unavailable(f"model '{name}' {label}is {e.state}: {e.reason or 'not loaded'}")
        return engine
