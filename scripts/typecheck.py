"""Type-check the shared package (rnnserve/) and the server (serve/ = rnnserve.serve) with mypy.

    python scripts/typecheck.py [extra mypy arguments]        # = make typecheck

The folders install under one import name through setuptools' package-dir mapping, which mypy
does not read: checked in place, serve/engine/batching.py would be module `serve.engine.batching`
and `import rnnserve.serve...` would not resolve. So this script builds a tree of symlinks with
the installed layout (rnnserve/<each file of rnnserve/>, rnnserve/serve -> serve/), runs
`mypy -p rnnserve` over it (settings from pyproject.toml's [tool.mypy]), and prints error paths
as the repository's own. train/ and export/ are not linked: the server never imports them
(tests/e2e/test_packaging.py checks it), and mypy reports an import of them as an error here.
Exit status: mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed module path -> the repository folder it comes from (the checked part of pyproject's package-dir).
PARTS = {"rnnserve/serve": "serve"}


def build_tree(tree: str) -> None:
    pkg = os.path.join(tree, "rnnserve")
    os.mkdir(pkg)
    for name in sorted(os.listdir(os.path.join(ROOT, "rnnserve"))):
        if name != "__pycache__":   # modules and any subpackage
            os.symlink(os.path.join(ROOT, "rnnserve", name), os.path.join(pkg, name))
    for installed, folder in PARTS.items():
        os.symlink(os.path.join(ROOT, folder), os.path.join(tree, installed))


def map_back(line: str, tree: str) -> str:
    """A mypy line about TREE/rnnserve/serve/x.py becomes one about serve/x.py (and rnnserve/ stays)."""
    for installed, folder in PARTS.items():
        line = line.replace(os.path.join(tree, installed) + os.sep, folder + os.sep)
    return line.replace(os.path.join(tree, "rnnserve") + os.sep, "rnnserve" + os.sep)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="rnnserve-typecheck-") as tree:
        build_tree(tree)
        env = dict(os.environ, MYPYPATH=tree)
        cmd = [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
               "-p", "rnnserve", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        for stream, text in ((sys.stdout, proc.stdout), (sys.stderr, proc.stderr)):
            for line in text.splitlines(keepends=True):
                stream.write(map_back(line, tree))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
