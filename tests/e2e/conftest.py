"""Every test in this folder is end-to-end: real processes, console scripts, the compose file.

They carry the `e2e` marker, so `pytest -m "not e2e"` runs the in-process suite alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
