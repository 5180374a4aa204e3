"""The worker writes the bytecode of the workflow modules before polling: the sandbox imports
them afresh for every run, and without a ``.pyc`` each import compiles the source again."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

import workflows.journey
from worker import warm_bytecode


def test_workflow_bytecode_is_written_where_imports_look(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A private prefix stands for a fresh, unwritten cache (as under PYTHONDONTWRITEBYTECODE).
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path))
    source = workflows.journey.__file__
    cached = Path(importlib.util.cache_from_source(source))
    assert not cached.exists()
    assert warm_bytecode() > 0
    assert cached.is_file()
    # The loader accepts it: its header matches the source, so it is used instead of compiling.
    loader = importlib.machinery.SourceFileLoader("workflows.journey", source)
    data = cached.read_bytes()
    assert data[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(data[8:12], "little") == int(Path(source).stat().st_mtime) & 0xFFFFFFFF
    assert loader.get_code("workflows.journey") is not None
    # Nothing left to do a second time.
    assert warm_bytecode() == 0
