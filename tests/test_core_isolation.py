"""The generic core never imports a medical-imaging library (ctgridit/core/__init__.py, docs/METHOD.md section 1).

Two checks: a subprocess in which monai, nibabel, SimpleITK and pydicom cannot
be imported still imports every core module (and none of the four gets loaded),
and a static scan of the sources under ``ctgridit/core`` finds no import of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ctgridit.core

CORE_DIR = Path(ctgridit.core.__file__).resolve().parent
REPO = CORE_DIR.parents[1]
BLOCKED = ("monai", "nibabel", "SimpleITK", "pydicom")
#: The adapters may depend on the core, never the other way round.
ADAPTERS = ("ctgridit.ct", "ctgridit.video", "ctgridit.cli")
CORE_MODULES = ("ctgridit.core", "ctgridit.core.grid", "ctgridit.core.embeddings", "ctgridit.core.dit",
                "ctgridit.core.diffusion", "ctgridit.core.sampler", "ctgridit.core.codecs",
                "ctgridit.core.conditioning", "ctgridit.core.legacy_folders", "ctgridit.core.pipeline")

CHILD = textwrap.dedent("""
    import importlib, importlib.abc, json, sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked by the isolation test")
            return None

    for name in list(sys.modules):                     # nothing pre-loaded by site hooks
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())

    blocker_works = []
    for name in BLOCKED:
        try:
            importlib.import_module(name)
        except ImportError:
            blocker_works.append(name)

    imported = []
    for name in {modules!r}:
        importlib.import_module(name)
        imported.append(name)
    from ctgridit.core.pipeline import GriDiTPipeline
    from ctgridit.core.settings import PipelineSettings, SamplingConfig
    from ctgridit.core.sampler import inpaint, sample_sequence
    from ctgridit.core.codecs import PixelCodec, VAECodec
    from ctgridit.core.legacy_folders import legacy_codec
    from ctgridit.core.dit import create_dit

    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    adapters = sorted(m for m in sys.modules if m.startswith({adapters!r}))
    print(json.dumps(dict(blocker_works=blocker_works, imported=imported, leaked=leaked, adapters=adapters)))
""")


def test_core_imports_without_medical_libraries():
    code = CHILD.format(blocked=BLOCKED, modules=CORE_MODULES, adapters=ADAPTERS)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"importing the core failed without medical libraries:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report["blocker_works"]) == sorted(BLOCKED)   # the test really blocks them
    assert report["imported"] == list(CORE_MODULES)
    assert report["leaked"] == []
    assert report["adapters"] == [], f"the core imported an adapter: {report['adapters']}"


def imported_names(source: str) -> set[str]:
    """Every module name a source imports: import statements and import_module/__import__ with a literal."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def forbidden(names: set[str]) -> set[str]:
    bad = {n for n in names if n.split(".")[0] in BLOCKED}
    bad |= {n for n in names if any(n == a or n.startswith(a + ".") for a in ADAPTERS)}
    return bad


def test_static_scan_detects_imports():
    """The scanner itself: it must see every way of importing a blocked module."""
    source = textwrap.dedent("""
        import os
        import nibabel as nib
        from SimpleITK import ReadImage
        def f():
            import pydicom.uid
            import importlib
            return importlib.import_module("monai.transforms"), __import__("ctgridit.ct.io")
        from . import grid
        from ctgridit.core.grid import tile
    """)
    assert forbidden(imported_names(source)) == {"nibabel", "SimpleITK", "pydicom.uid", "monai.transforms",
                                                 "ctgridit.ct.io"}


@pytest.mark.parametrize("path", sorted(CORE_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_no_core_file_imports_medical_libraries(path: Path):
    bad = forbidden(imported_names(path.read_text()))
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_scan_covers_the_core():
    found = {p.stem for p in CORE_DIR.rglob("*.py")}
    assert {"__init__", "grid", "dit", "diffusion", "sampler", "codecs", "pipeline"} <= found
