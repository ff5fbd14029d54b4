"""Packaging: every package folder is listed in pyproject, the mapped folders import as
sq_pt2e.passes / sq_pt2e.backends from outside the repository, and nothing imports them
under their folder names (which would create second module objects)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    config = _pyproject()["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]) if relative.parts else package)
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"


def test_mapped_packages_import_from_outside_the_repository(tmp_path) -> None:
    code = "import sq_pt2e.passes.fold_weight_norm, sq_pt2e.backends.inductor; print(sq_pt2e.passes.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent.name == "passes"


def test_no_module_imports_passes_or_backends_by_folder_name() -> None:
    pattern = re.compile(r"^\s*(from|import) (passes|backends)\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for folder in ("sq_pt2e", "passes", "backends", "examples", "tests",
                                                          "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_import_sq_pt2e_does_not_load_executorch() -> None:
    code = "import sys, sq_pt2e; print(any(m.startswith('executorch') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
