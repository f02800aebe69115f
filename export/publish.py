"""Atomic publishing into a model repository REPO/<model>/<version>/, pruning, manifest.json.

A server may be reading REPO while we write (serve/admin/repository.py scans REPO/<model>/
<positive integer>/model.onnx and skips names starting with '.'). So:
  * everything is written under REPO/.staging-XXXX/ (same filesystem, ignored by the
    server) and moved into place with one os.rename once it passed the gate: a new model
    folder appears whole (version + config.pbtxt), a new version of an existing model
    appears whole; config.pbtxt and manifest.json are replaced with os.replace;
  * pruned versions are first renamed out of REPO/<model>/ (they vanish at once), then deleted;
  * one batch at a time: an exclusive flock on REPO/.rnnserve-export.lock; staging
    folders left by a killed run are removed by the next one.
Versions: a new version is newest + 1; `newest_sha` is the checkpoint sha256 of the
newest version (from the manifest, else from the model's metadata_props).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import onnx

from rnnserve.contract import CONFIG_FILENAME, KEY_CHECKPOINT_SHA256, MODEL_FILENAME
from rnnserve.export.onnx_export import ExportError
from rnnserve.files import atomic_write_json as write_json
from rnnserve.files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "rnnserve-manifest/1"
LOCK_FILENAME = ".rnnserve-export.lock"
STAGING_PREFIX = ".staging-"
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def sanitize_name(raw: str) -> str:
    """A model folder name: [A-Za-z0-9_.-] only, never hidden ('.x' is skipped by the server), never empty."""
    name = _BAD_CHARS.sub("_", raw.strip())
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group(0)), name)
    return name or "model"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_entries(folder: str) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every non-hidden file under folder."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(f for f in filenames if not f.startswith(".")):
            path = os.path.join(dirpath, fn)
            out[os.path.relpath(path, folder)] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    return out


class RepoWriter:
    """A model repository opened for publishing (use as a context manager: holds the lock)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.manifest: dict[str, Any] = {}
        self.staging = ""
        self._lock_fd: int | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> RepoWriter:
        os.makedirs(self.root, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.root, LOCK_FILENAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another export batch is publishing into %s; waiting for it", self.root)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        for d in os.listdir(self.root):  # we hold the lock: any staging folder is a dead run's
            if d.startswith(STAGING_PREFIX):
                log.warning("removing %s left by an interrupted run", d)
                shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
        self.manifest = self._load_manifest()
        self.staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.staging:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- reading --------------------------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        """Published versions, oldest first (the server's rule: positive integer folder names)."""
        model_dir = os.path.join(self.root, name)
        if not os.path.isdir(model_dir):
            return []
        return sorted(int(v) for v in os.listdir(model_dir)
                      if v.isdigit() and int(v) > 0 and os.path.isdir(os.path.join(model_dir, v)))

    def newest(self, name: str) -> int | None:
        vs = self.versions(name)
        return vs[-1] if vs else None

    def record(self, name: str, version: int) -> dict[str, Any]:
        return self.manifest["models"].get(name, {}).get("versions", {}).get(str(version), {})

    def newest_sha(self, name: str) -> str | None:
        """The checkpoint sha256 the newest published version was exported from (None: no version)."""
        v = self.newest(name)
        if v is None:
            return None
        sha = self.record(name, v).get("checkpoint_sha256")
        if sha:
            return sha
        path = self.model_path(name, v)
        try:
            props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        except Exception as e:  # unreadable: treat as changed, a new version will be exported
            log.warning("cannot read %s (%s); its checkpoint counts as changed", path, e)
            return None
        return props.get(KEY_CHECKPOINT_SHA256)

    def model_path(self, name: str, version: int) -> str:
        return os.path.join(self.root, name, str(version), MODEL_FILENAME)

    # -- writing --------------------------------------------------------------------------------
    def staging_dir(self, name: str, version: int) -> str:
        path = os.path.join(self.staging, name, str(version))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def work_dir(self, tag: str) -> str:
        path = os.path.join(self.staging, ".work", tag)
        os.makedirs(path, exist_ok=True)
        return path

    def discard(self, staged: str) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def publish(self, name: str, version: int, staged: str, config_text: str, record: dict[str, Any],
                model_info: dict[str, Any] | None = None) -> str:
        """Move staged (= staging_dir(name, version)) to REPO/name/version; write config + manifest."""
        model_dir = os.path.join(self.root, name)
        final = os.path.join(model_dir, str(version))
        if os.path.lexists(final):
            raise ExportError(f"{final} already exists; refusing to overwrite a published version")
        if not os.path.isdir(model_dir):
            staged_model_dir = os.path.dirname(staged)
            atomic_write_text(os.path.join(staged_model_dir, CONFIG_FILENAME), config_text)
            os.rename(staged_model_dir, model_dir)  # the new model folder appears whole
        else:
            os.rename(staged, final)  # the new version appears whole
            atomic_write_text(os.path.join(model_dir, CONFIG_FILENAME), config_text)
        entry = self.manifest["models"].setdefault(name, {"versions": {}})
        entry.update(model_info or {})
        entry["versions"][str(version)] = {**record, "created": utc_now(), "files": file_entries(final)}
        self.save_manifest()
        log.info("published %s", final)
        return final

    def annotate(self, name: str, version: int, key: str, value: Any) -> None:
        rec = self.manifest["models"].get(name, {}).get("versions", {}).get(str(version))
        if rec is not None:
            rec[key] = value
            self.save_manifest()

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions; returns the removed versions."""
        if keep < 1:
            raise ValueError("keep must be >= 1")
        old = self.versions(name)[:-keep]
        trash = os.path.join(self.staging, ".trash")
        os.makedirs(trash, exist_ok=True)
        for v in old:
            gone = os.path.join(trash, f"{name}.{v}")
            os.rename(os.path.join(self.root, name, str(v)), gone)  # vanishes from REPO at once
            shutil.rmtree(gone, ignore_errors=True)
            log.info("pruned %s/%d", name, v)
        if old:
            self.save_manifest()
        return old

    # -- manifest -------------------------------------------------------------------------------
    def _load_manifest(self) -> dict[str, Any]:
        path = os.path.join(self.root, MANIFEST_FILENAME)
        empty = {"format": MANIFEST_FORMAT, "models": {}}
        if not os.path.exists(path):
            return empty
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("models"), dict):
                raise ValueError(f"format is {data.get('format')!r}")
            return data
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring unreadable %s (%s); it will be rewritten", path, e)
            return empty

    def save_manifest(self) -> None:
        """Reconcile with the folders on disk, then replace manifest.json atomically."""
        models = self.manifest["models"]
        for name in list(models):
            on_disk = {str(v) for v in self.versions(name)}
            versions = models[name].get("versions", {})
            for v in [v for v in versions if v not in on_disk]:
                del versions[v]
            if not versions:
                del models[name]
                continue
            cfg = os.path.join(self.root, name, CONFIG_FILENAME)
            if os.path.isfile(cfg):
                models[name]["config"] = {"file": CONFIG_FILENAME, "sha256": file_sha256(cfg),
                                          "bytes": os.path.getsize(cfg)}
        self.manifest["updated"] = utc_now()
        write_json(os.path.join(self.root, MANIFEST_FILENAME), self.manifest)
