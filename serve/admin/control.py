"""Model control: which names are model names, where they may live, and whether a client may
load or unload at all (--model-control-mode, Triton's names).

A model name is one path component of the repository folder: not empty, no separator, not
`.`/`..`, not hidden, no NUL, at most MAX_NAME_CHARS characters; and the folder it names
(symlinks resolved) is inside the repository. So no client-supplied name reaches outside it,
and scans skip model folders that resolve outside it too. What is inside a model folder is the
operator's (`--model` links its one version to the exported file).
"""
from __future__ import annotations

import logging
import os

from rnnserve.serve.errors import InvalidArgument, PermissionDenied, quoted

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 255   # a file name's limit on common filesystems (NAME_MAX)
_SEPARATORS = {"/", "\\", os.sep, os.altsep or "/"}


def name_problem(name: str) -> str:
    """Why `name` cannot be a model name ("" if it can), without touching the filesystem."""
    if not name:
        return "the model name is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"the model name has {len(name)} characters, over the limit of {MAX_NAME_CHARS}"
    if name in (".", ".."):
        return "the model name cannot be '.' or '..'"
    if any(sep in name for sep in _SEPARATORS) or os.path.isabs(name):
        return "a model name is one folder of the repository: no path separators, no absolute paths"
    if "\0" in name:
        return "the model name contains a NUL character"
    if name.startswith("."):
        return "hidden folders (names starting with '.') are not models"
    return ""


def inside(root: str, path: str) -> bool:
    """True if `path`, every symlink resolved, is `root` (resolved) or below it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def model_dir(root: str, name: str) -> str:
    """The folder of model `name` in repository `root`; InvalidArgument for a name that is not one
    folder of the repository (checked before anything is opened)."""
    problem = name_problem(name)
    if problem:
        raise InvalidArgument(f"{problem}: {quoted(name)}")
    path = os.path.join(root, name)
    if not inside(root, path):
        raise InvalidArgument(f"model {quoted(name)} resolves outside the model repository")
    return path


def require_explicit(mode: str, action: str) -> None:
    """RepositoryModelLoad/Unload are allowed only in explicit mode."""
    if mode != "explicit":
        raise PermissionDenied(f"{action} is disabled: the server runs with --model-control-mode {mode} "
                               f"(start it with --model-control-mode explicit to load and unload over gRPC)")
