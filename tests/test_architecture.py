"""The import graph of the whole tree: no circle, no upward import, no hidden (in-function) import.

The layers are those of ``docs/architecture.md``. A module imports only from its own layer or the
ones below; the kernel package lies below the training package, and the folders that use the
packages (``benchmarks/``, ``scripts/``, ``examples/``) lie above both: they may import the packages,
never the reverse, and none of them imports another (``MAY_IMPORT``). Nothing imports ``tests/``.
A module missing from the table fails the test: place it in a layer (here and in the document).
In-function imports are refused in the packages only (benchmarks and scripts import optional
tools such as Triton lazily), but every import, wherever it stands, is an edge of the circle check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rollingq_kernels": ROOT / "rollingq_kernels", "rollingq": ROOT / "python" / "rollingq"}
# The folders around the packages. benchmarks is a package (relative imports); the files of scripts/
# and examples/ run as scripts, each importing a sibling by its bare name (``from study_tables import``).
USERS = {"benchmarks": ROOT / "benchmarks", "scripts": ROOT / "scripts", "examples": ROOT / "examples"}
FLAT = {"scripts", "examples"}
TESTS = "tests"  # first-party too, so that an import of it is seen (and refused) anywhere above
# The top-level parts each part may import (its own included).
MAY_IMPORT = {
    "rollingq_kernels": {"rollingq_kernels"},
    "rollingq": {"rollingq_kernels", "rollingq"},
    "benchmarks": {"rollingq_kernels", "rollingq", "benchmarks"},
    "scripts": {"rollingq_kernels", "rollingq", "scripts"},
    "examples": {"rollingq_kernels", "rollingq"},
}
EXTENSIONS = {"rollingq_kernels._C"}  # compiled; imports nothing of the packages
TRAINING = 10  # every layer of the training package lies above every layer of the kernel package
USER = 30  # benchmarks, scripts and examples lie above every layer of both packages

# First-party imports allowed inside a function: (importing module, prefix of the imported module) -> why.
# docs/architecture.md ("Optional imports") lists the same; each is still an edge of the layer and circle checks.
OPTIONAL_IMPORTS = {
    ("rollingq_kernels.ops", "rollingq_kernels.triton"): "Triton is imported on the first use of the Triton backend",
    ("rollingq_kernels.apply", "rollingq_kernels.integrations.transformers"):
        "importing it imports transformers (an optional extra) and registers the 'rollingq' attention",
}

# Longest prefix wins; a prefix without a trailing dot also covers e.g. triton_attention, triton_forward.
LAYERS = {
    # rollingq_kernels
    "rollingq_kernels._library": 0,
    "rollingq_kernels.dropout": 0,
    "rollingq_kernels.class_query": 0,
    "rollingq_kernels.token_layout": 0,
    "rollingq_kernels.forward_ad": 0,
    "rollingq_kernels.stats": 0,
    "rollingq_kernels.rebalance": 0,
    "rollingq_kernels.checks": 1,
    "rollingq_kernels.reference": 1,
    "rollingq_kernels.flex": 1,
    "rollingq_kernels.triton": 1,
    "rollingq_kernels.accumulator": 1,
    "rollingq_kernels.indicators": 1,
    "rollingq_kernels.scripting": 0,
    "rollingq_kernels.ops": 2,
    "rollingq_kernels.layout": 2,
    "rollingq_kernels.tap": 2,
    "rollingq_kernels.layer_checks": 2,
    "rollingq_kernels.adapters": 2,
    "rollingq_kernels.module": 3,
    "rollingq_kernels.decision": 4,
    "rollingq_kernels.settings": 4,
    "rollingq_kernels.policy": 4,
    "rollingq_kernels.probe": 4,
    "rollingq_kernels.estimation": 4,
    "rollingq_kernels.layers": 4,
    "rollingq_kernels.controller": 4,
    "rollingq_kernels.integrations": 4,
    "rollingq_kernels.apply": 5,
    "rollingq_kernels.__main__": 5,
    "rollingq_kernels": 5,
    # rollingq
    "rollingq.files": TRAINING + 0,
    "rollingq.runlock": TRAINING + 0,
    "rollingq.interrupts": TRAINING + 0,
    "rollingq.seeding": TRAINING + 0,
    "rollingq.distributed": TRAINING + 0,
    "rollingq.schedule": TRAINING + 0,
    "rollingq.inputs": TRAINING + 0,
    "rollingq.schema": TRAINING + 0,
    "rollingq.yaml_input": TRAINING + 0,
    "rollingq.extras": TRAINING + 0,
    "rollingq.records": TRAINING + 1,
    "rollingq.checkpoint": TRAINING + 1,
    "rollingq.data": TRAINING + 2,
    "rollingq.models": TRAINING + 2,
    "rollingq.ogm": TRAINING + 2,
    "rollingq.analysis": TRAINING + 2,
    "rollingq.analysis.metrics": TRAINING + 2,
    "rollingq.analysis.noise": TRAINING + 2,
    "rollingq.sections": TRAINING + 3,
    "rollingq.config": TRAINING + 3,
    "rollingq.prepare": TRAINING + 3,
    "rollingq.build": TRAINING + 4,
    "rollingq.validate": TRAINING + 5,
    "rollingq.logs": TRAINING + 5,
    "rollingq.rundir": TRAINING + 5,
    "rollingq.runstate": TRAINING + 5,
    "rollingq.trainer": TRAINING + 5,
    "rollingq.train": TRAINING + 5,
    "rollingq.evaluate": TRAINING + 6,
    "rollingq.study": TRAINING + 6,
    "rollingq.analysis.runs": TRAINING + 6,
    "rollingq.analysis.plots": TRAINING + 6,
    "rollingq.analysis.report": TRAINING + 6,
    "rollingq.demo": TRAINING + 7,
    "rollingq.demo_text": TRAINING + 7,
    "rollingq.cli": TRAINING + 7,
    "rollingq.__main__": TRAINING + 7,
    "rollingq": TRAINING + 7,
    # the users of the packages
    "benchmarks": USER,
    "scripts": USER,
    "examples": USER,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in (PACKAGES | USERS).items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _part(name: str) -> str:
    """The top-level part of a module name: a package, a folder of :data:`USERS`, ``tests``, or another."""
    return name.split(".")[0]


def _first_party(name: str) -> bool:
    return _part(name) in PACKAGES or _part(name) in USERS or _part(name) == TESTS


def _sibling(module: str, name: str, modules: dict[str, Path]) -> str:
    """``name`` as the importing script sees it: a sibling file of a :data:`FLAT` folder, or ``name``."""
    folder = _part(module)
    if folder in FLAT and f"{folder}.{name}" in modules:
        return f"{folder}.{name}"
    return name


def _refused_part(module: str, target: str) -> bool:
    """Whether ``module`` may not import ``target`` by :data:`MAY_IMPORT` (tests: by nobody here)."""
    return _part(target) not in MAY_IMPORT.get(_part(module), set())


def _layer(module: str) -> int | None:
    """The layer of ``module``: its longest entry in :data:`LAYERS` that is the module or a package above it.
    A package root (``rollingq``, ``rollingq_kernels``) places only its ``__init__``, so that a new module of
    a package must be placed by name; a user folder (``benchmarks``, …) places everything in it."""
    matches = [p for p in LAYERS if module == p or (module.startswith(p + ".") and p not in PACKAGES)]
    best = max(matches, key=len, default=None)
    return None if best is None else LAYERS[best]


def _declared_optional(module: str, target: str) -> bool:
    return any(module == src and target.startswith(prefix) for src, prefix in OPTIONAL_IMPORTS)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(target module, line, inside a function or class)`` of every first-party import of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(base: str, name: str | None) -> str:
        if name is not None and f"{base}.{name}" in modules | dict.fromkeys(EXTENSIONS):
            return f"{base}.{name}"
        return base

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = (_sibling(module, a.name, modules) for a in child.names)
                found.extend((name, child.lineno, inner) for name in names if _first_party(name))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = module.split(".")
                    keep = len(parts) - child.level + (1 if is_package else 0)
                    base = ".".join(parts[:keep] + ([child.module] if child.module else []))
                else:
                    base = _sibling(module, child.module or "", modules)
                if _first_party(base):
                    found.extend((resolve(base, a.name), child.lineno, inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in modules.items():
        for target, line, nested in _imports(module, path, modules):
            where = f"{path.relative_to(ROOT)}:{line}"
            if _refused_part(module, target):
                problems.append(f"{where}: {module} imports {target}: {_part(module)} may import only "
                                f"{sorted(MAY_IMPORT.get(_part(module), ()))}")
                continue
            if nested and _part(module) in PACKAGES and not _declared_optional(module, target):
                problems.append(f"{where}: {module} imports {target} inside a function or class (a hidden edge)")
            if target in EXTENSIONS or target == module:
                continue
            edges[module].add(target)
            src, dst = _layer(module), _layer(target)
            if src is not None and dst is not None and dst > src:
                problems.append(f"{where}: {module} (layer {src}) imports {target} (layer {dst}): an upward import")
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer(m) is None]
    assert not missing, f"place these modules in LAYERS (and docs/architecture.md): {missing}"


def test_a_new_module_of_a_package_is_not_placed_by_its_package_root():
    # the roots place only their __init__, and an entry places its own submodules, not a name that merely
    # starts with it: a module nobody placed must fail the test above
    assert _layer("rollingq.no_such_module") is None and _layer("rollingq_kernels.no_such_module") is None
    assert _layer("rollingq") == LAYERS["rollingq"] and _layer("rollingq.demo_textual") is None
    assert _layer("benchmarks._inputs") == LAYERS["benchmarks"]


def test_no_import_circle():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_upward_or_hidden_import():
    _, problems = _graph()
    assert problems == [], "\n".join(problems)


def test_the_checker_sees_circles_and_upward_imports():
    """The check can fail: a made-up circle and an upward edge are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("rollingq_kernels.triton.forward") == 1 and _layer("rollingq.data.cremad") == TRAINING + 2
    edges, _ = _graph()
    assert "rollingq_kernels.accumulator" in edges["rollingq_kernels.controller"]
    assert "rollingq_kernels.triton" in edges["rollingq_kernels.ops"]  # a declared optional import
    assert not _declared_optional("rollingq_kernels.module", "rollingq_kernels.triton")
    assert _layer("rollingq_kernels.controller") > _layer("rollingq_kernels.accumulator")


def test_the_checker_sees_the_tree_around_the_packages():
    """benchmarks/ and scripts/ are in the graph, with their lazy and sibling imports, and held to MAY_IMPORT."""
    edges, _ = _graph()
    assert "benchmarks._shapes" in edges["benchmarks._providers"]
    assert "benchmarks._cubin" in edges["benchmarks.compile_gate"]  # an in-function `from . import _cubin`
    assert "scripts.study_indicators" in edges["scripts.study_tables"]  # a bare sibling import
    assert "rollingq.study" in edges["scripts.study_tables"]
    assert _refused_part("rollingq_kernels.ops", "benchmarks._arith")
    assert _refused_part("rollingq.train", "scripts.study_tables")
    assert _refused_part("benchmarks._e2e", "scripts.study_tables")
    assert _refused_part("scripts.study_tables", "benchmarks._arith")
    assert _refused_part("benchmarks._e2e", "tests.fake_data")
    assert not _refused_part("benchmarks._e2e", "rollingq.build")
    assert _layer("benchmarks._providers") == _layer("scripts.synthetic_study") == USER
