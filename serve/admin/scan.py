"""Scanning a model repository: DIR/<model>/<version>/model.onnx, as Triton lays it out.

Model folders are single path components that resolve inside the repository; version
folders are positive integers in ASCII digits (no leading zero). Anything else is
skipped and logged once, never an error: a stray folder must not stop a start or a
poll pass. Loading what was found is serve/admin/repository.py's job.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rnnserve.contract import MODEL_FILENAME
from rnnserve.serve.admin.control import inside, name_problem
from rnnserve.serve.engine.model_engine import ModelEngine
from rnnserve.serve.errors import Unavailable

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"


@dataclass
class ModelEntry:
    name: str
    version: str            # "" for a model folder that has no version folder at all
    path: str
    state: str = LOADING
    reason: str = ""
    engine: ModelEngine | None = None            # the loaded version (it owns its ModelInstance)
    fingerprint: tuple | None = None   # stat facts of `path` and its config.pbtxt when it was last (tried to be) loaded
    sha256: str = ""                                 # of the loaded model.onnx


_skipped: set[str] = set()   # folders already reported as skipped (polls repeat every pass)


def _skip(path: str, why: str) -> None:
    if path not in _skipped:
        _skipped.add(path)
        log.warning("skipping %s: %s", path, why)


def is_version(folder: str) -> bool:
    """Version folders are positive integers in ASCII digits ('²' or '٣' pass str.isdigit)."""
    return folder.isascii() and folder.isdigit() and not folder.startswith("0")


def scan_model(root: str, name: str) -> list[ModelEntry]:
    """The version entries of one model folder, oldest first (not loaded yet)."""
    model_dir = os.path.join(root, name)
    versions = []
    for v in os.listdir(model_dir):
        path = os.path.join(model_dir, v)
        if not os.path.isdir(path):
            continue
        if not is_version(v):
            _skip(path, "a version folder name is a positive integer in ASCII digits")
        else:
            versions.append(int(v))
    versions.sort()
    if not versions:
        return [ModelEntry(name, "", model_dir, UNAVAILABLE,
                           f"no version folder: expected {name}/<positive integer>/{MODEL_FILENAME}")]
    return [ModelEntry(name, str(v), os.path.join(model_dir, str(v), MODEL_FILENAME)) for v in versions]


def is_model_dir(root: str, name: str) -> bool:
    path = os.path.join(root, name)
    if name_problem(name) or not os.path.isdir(path):
        return False
    if not inside(root, path):
        _skip(path, "it resolves outside the model repository")
        return False
    return True


def scan_names(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise Unavailable(f"model repository {root!r} is not a directory")
    return sorted(d for d in os.listdir(root) if is_model_dir(root, d))
