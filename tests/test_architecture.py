"""The layers of docs/ARCHITECTURE.md: no module imports a higher layer, no import cycle, adapters apart.

Every import counts, at the top of a module or inside a function (a lazy import
is still a dependency); adapters found by name through the registry
(``ctgridit/adapters.py``) are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctgridit"

#: Layer of every module, by name prefix (the longest prefix wins): docs/ARCHITECTURE.md.
LAYERS = {
    "ctgridit.errors": 0, "ctgridit.files": 0, "ctgridit.limits": 0, "ctgridit.seeds": 0, "ctgridit.signals": 0,
    "ctgridit.progress": 0, "ctgridit.device": 0, "ctgridit.data_folder": 0,
    "ctgridit.core": 1,
    "ctgridit.adapters": 2, "ctgridit.training": 2, "ctgridit.model_folders": 2, "ctgridit.seeded_runs": 2,
    "ctgridit.ct": 3, "ctgridit.video": 3,
    "ctgridit.cli": 4, "ctgridit.entry": 4, "ctgridit.__main__": 4, "ctgridit": 4,
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def graph() -> dict[str, set[str]]:
    """module -> the ctgridit modules it imports."""
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else None
                if base:
                    targets.add(base)
                    targets.update(f"{base}.{a.name}" for a in node.names)
        edges[name] = {t for t in targets if t in known and t != name}
    return edges


def test_every_module_has_a_layer():
    assert all(layer(m) in range(5) for m in modules())


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} ({layer(m)}) -> {t} ({layer(t)})" for m, ts in graph().items() for t in ts
                    if layer(t) > layer(m) and t != "ctgridit")
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("generic", ["ctgridit.training", "ctgridit.adapters", "ctgridit.model_folders",
                                     "ctgridit.seeded_runs"])
def test_generic_parts_import_no_adapter(generic):
    """The trainer, the registry and the model folders find adapters by name, never by import."""
    bad = sorted(f"{m} -> {t}" for m, ts in graph().items() if m == generic or m.startswith(generic + ".")
                 for t in ts if t.startswith(("ctgridit.ct", "ctgridit.video")))
    assert not bad, bad


def test_adapters_do_not_import_each_other():
    bad = sorted(f"{m} -> {t}" for m, ts in graph().items() for t in ts
                 if (m.startswith("ctgridit.ct") and t.startswith("ctgridit.video"))
                 or (m.startswith("ctgridit.video") and t.startswith("ctgridit.ct")))
    assert not bad, bad
