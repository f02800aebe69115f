"""Packaging and layering: one import name, the console scripts, and the import graph.

- The installed distribution's only top-level name is `rnnserve`; from a neutral working
  directory `import train`, `import export` and `import serve` fail.
- The four console scripts exist and answer --help.
- The import graph (read from the source with ast, not guessed from sys.modules):
  serve/ imports neither rnnserve.train nor rnnserve.export nor torch/onnx; the shared
  rnnserve/ package imports none of the parts; train/ never imports export/ or serve/;
  export/ never imports serve/. No module imports the old top-level names.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT

SCRIPTS = ("rnnserve-train", "rnnserve-export", "rnnserve-server", "rnnserve-client")

# part folder -> module prefixes it must never import
FORBIDDEN = {
    "rnnserve": ("rnnserve.train", "rnnserve.export", "rnnserve.serve", "torch", "onnx", "onnxruntime", "grpc"),
    "serve": ("rnnserve.train", "rnnserve.export", "torch", "onnx"),
    "train": ("rnnserve.export", "rnnserve.serve", "onnx", "onnxruntime", "grpc"),
    "export": ("rnnserve.serve", "grpc"),
}
OLD_NAMES = ("train", "export", "serve")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use the absolute rnnserve.* name"
            out.append(node.module or "")
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def import_graph() -> dict[str, list[str]]:
    """{source file relative to ROOT: [imported modules]} for every part folder."""
    graph = {}
    for part in FORBIDDEN:
        for path in sorted((ROOT / part).rglob("*.py")):
            if "gen" in path.relative_to(ROOT).parts:
                continue   # generated code imports only protobuf/grpc and itself
            graph[str(path.relative_to(ROOT))] = _imports(path)
    return graph


def test_the_import_graph_has_no_upward_or_foreign_edges():
    bad = []
    for source, modules in import_graph().items():
        part = source.split(os.sep)[0]
        for module in modules:
            if any(_matches(module, p) for p in FORBIDDEN[part]):
                bad.append(f"{source} imports {module}")
            if any(_matches(module, old) for old in OLD_NAMES):
                bad.append(f"{source} imports the old top-level name {module}")
    assert not bad, "\n".join(bad)


def test_serve_loads_without_torch_or_onnx(tmp_path):
    modules = sorted(
        "rnnserve.serve." + ".".join(p.relative_to(ROOT / "serve").with_suffix("").parts)
        for p in (ROOT / "serve").rglob("*.py") if p.name != "__init__.py" and "gen" not in p.parts
        and p.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", OLD_NAMES)
def test_old_top_level_names_are_not_importable(tmp_path, name):
    out = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out.stderr


def test_the_distribution_installs_one_top_level_name():
    dist = importlib.metadata.distribution("rnnserve")
    assert (dist.read_text("top_level.txt") or "").split() == ["rnnserve"]
    import rnnserve
    assert dist.version == rnnserve.__version__
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert set(scripts) == set(SCRIPTS)
    assert all(v.startswith("rnnserve.") for v in scripts.values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help(tmp_path, script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    out = subprocess.run([path, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and script in out.stdout
