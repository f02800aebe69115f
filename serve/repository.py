"""The model repository: DIR/<model>/<version>/model.onnx, as Triton lays it out.

Versions are positive integer folder names. Every version found is loaded; the
newest READY version answers requests that name no version, and older ones are
addressable by their version string. A version that fails to load (corrupt file,
bad metadata, graph not matching the metadata) is recorded as UNAVAILABLE with
the reason, and logged; the other models keep serving.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from export.metadata import parse_metadata

from .engine import ModelEngine
from .errors import NotFound, Unavailable
from .runtime import DeviceError, ModelInstance, create_session
from .settings import ServeSettings

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"


@dataclass
class ModelEntry:
    name: str
    version: str            # "" for a model folder that has no version folder at all
    path: str
    state: str = LOADING
    reason: str = ""
    instance: Optional[ModelInstance] = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def scan_model(root: str, name: str) -> List[ModelEntry]:
    """The version entries of one model folder, oldest first (not loaded yet)."""
    model_dir = os.path.join(root, name)
    versions = sorted(int(v) for v in os.listdir(model_dir)
                      if v.isdigit() and int(v) > 0 and os.path.isdir(os.path.join(model_dir, v)))
    if not versions:
        return [ModelEntry(name, "", model_dir, UNAVAILABLE,
                           f"no version folder: expected {name}/<positive integer>/{MODEL_FILE}")]
    return [ModelEntry(name, str(v), os.path.join(model_dir, str(v), MODEL_FILE)) for v in versions]


def _engines(entries: Sequence[ModelEntry]) -> List[ModelEngine]:
    return [e.instance.engine for e in entries if e.instance is not None and e.instance.engine is not None]


def scan_names(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise Unavailable(f"model repository {root!r} is not a directory")
    return sorted(d for d in os.listdir(root)
                  if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def load_entry(entry: ModelEntry, settings: ServeSettings, providers: Sequence[str]) -> None:
    """Open, check and warm one version; on failure record UNAVAILABLE + reason (DeviceError propagates)."""
    if entry.state == UNAVAILABLE:
        log.error("model %s: %s", entry.name, entry.reason)
        return
    try:
        if not os.path.isfile(entry.path):
            raise FileNotFoundError(f"missing {MODEL_FILE} in {os.path.dirname(entry.path)}")
        session = create_session(entry.path, providers, settings.device,
                                 settings.intra_op_threads, settings.inter_op_threads)
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map)
        instance = ModelInstance(entry.name, entry.version, entry.path, session, meta)
        if settings.warmup:
            instance.warmup(settings.max_seq_len)
        instance.engine = ModelEngine(instance, settings)
    except DeviceError:
        raise
    except Exception as e:
        entry.state, entry.reason = UNAVAILABLE, f"failed to load {entry.path}: {_first_line(e)}"
        log.error("model %s version %s is UNAVAILABLE: %s", entry.name, entry.version, entry.reason)
        return
    entry.instance, entry.state, entry.reason = instance, READY, ""
    log.info("model %s version %s READY (%s; providers %s; vocab %d; state inputs %s)", entry.name,
             entry.version, meta.arch, ", ".join(instance.providers), meta.vocab_size,
             instance.state_inputs or "none")


class Repository:
    """Thread-safe table name -> [ModelEntry], oldest version first."""

    def __init__(self, settings: ServeSettings, providers: Sequence[str]):
        self.settings = settings
        self.providers = list(providers)
        self._lock = threading.Lock()
        self._models: Dict[str, List[ModelEntry]] = {}

    def load_all(self) -> None:
        for name in scan_names(self.settings.repository):
            self.load_model(name)

    def load_model(self, name: str) -> None:
        """(Re)scan and load every version of one model, then swap it in atomically."""
        root = self.settings.repository
        if name not in scan_names(root):
            raise NotFound(f"model '{name}' is not in the repository {root}")
        entries = scan_model(root, name)
        for entry in entries:
            load_entry(entry, self.settings, self.providers)
        with self._lock:
            old = _engines(self._models.get(name, []))
            self._models[name] = entries
        for engine in old:  # the old versions close once their in-flight work has finished
            engine.retire()

    def unload_model(self, name: str) -> None:
        with self._lock:
            entries = self._models.get(name)
            if entries is None:
                raise NotFound(f"unknown model '{name}'")
            old = _engines(entries)
            for e in entries:
                e.instance, e.state, e.reason = None, UNLOADED, "unloaded by request"
        # In-flight requests keep their own reference to the instance and finish first.
        for engine in old:
            engine.retire()
        log.info("model %s unloaded", name)

    def close(self) -> None:
        """Unload everything; queued work runs first, then the engines' threads stop."""
        with self._lock:
            engines = [x for name in self._models for x in _engines(self._models[name])]
            for name in self._models:
                for e in self._models[name]:
                    e.instance, e.state = None, UNLOADED
        for engine in engines:
            engine.close()

    # -- lookups -------------------------------------------------------------------------------
    def names(self) -> List[str]:
        with self._lock:
            return sorted(self._models)

    def entries(self, name: str = "") -> List[ModelEntry]:
        with self._lock:
            if name:
                return list(self._models.get(name, []))
            return [e for n in sorted(self._models) for e in self._models[n]]

    def ready_versions(self, name: str) -> List[str]:
        return [e.version for e in self.entry_list(name) if e.state == READY]

    def entry_list(self, name: str) -> List[ModelEntry]:
        with self._lock:
            entries = self._models.get(name)
            known = sorted(self._models)
        if entries is None:
            raise NotFound(f"unknown model '{name}'; models in the repository: {', '.join(known) or 'none'}")
        return list(entries)

    def entry(self, name: str, version: str = "") -> ModelEntry:
        """The entry for (name, version); version "" = the newest READY version. NotFound if unknown."""
        entries = self.entry_list(name)
        if version:
            for e in entries:
                if e.version == version:
                    return e
            have = ", ".join(e.version for e in entries if e.version) or "none"
            raise NotFound(f"model '{name}' has no version '{version}'; versions: {have}")
        ready = [e for e in entries if e.state == READY]
        return ready[-1] if ready else entries[-1]

    def get(self, name: str, version: str = "") -> ModelInstance:
        """The instance serving (name, version): NotFound if unknown, Unavailable if not READY."""
        e = self.entry(name, version)
        inst = e.instance
        if e.state != READY or inst is None:
            label = f"version {e.version} " if e.version else ""
            raise Unavailable(f"model '{name}' {label}is {e.state}: {e.reason or 'not loaded'}")
        return inst
