"""The package's layers: the run format at the centre, written by the probe, read by everything else.

Scans the source with ``ast`` (nothing is imported), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules that read runs; none of them may reach into the probe package for the run format.
READERS = ("loft_probe/run", "loft_probe/comparison.py", "loft_probe/compatibility.py", "loft_probe/summary.py",
           "loft_probe/diagnosis", "loft_probe/reporting", "loft_probe/sweeps", "loft_probe/study", "cli")
PROBE_NAMES = {"probe", "Probe", "attach"}  # what `from loft_probe import ...` would bring from the probe


def imported_modules(path: Path) -> list[str]:
    """Every module an (absolute) import statement in ``path`` names, with ``from X import y`` as ``X.y``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def reader_files() -> list[Path]:
    files = []
    for entry in READERS:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_the_scan_sees_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom loft_probe.probe.probe import attach\n"
                      "def f():\n    from loft_probe import Probe\n")
    assert imported_modules(source) == ["os", "loft_probe.probe.probe.attach", "loft_probe.Probe"]


def test_the_readers_are_all_there():
    assert len(reader_files()) >= 30  # a renamed folder must not make the check below vacuous


@pytest.mark.parametrize("path", reader_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reader_imports_the_probe(path):
    bad = [name for name in imported_modules(path)
           if name.startswith("loft_probe.probe.") or name.removeprefix("loft_probe.") in PROBE_NAMES]
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}: read runs through loft_probe.run"
