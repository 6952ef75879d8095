"""The package's layering, read from the source with ``ast``: no import cycle, lazy exports that cannot shadow
their own modules, and modules a newcomer can read in one sitting.

Edges of the graph: every ``import`` / ``from ... import`` of a ``qv_jax`` module anywhere in a file (module level,
inside functions, under ``TYPE_CHECKING``); importing ``a.b.c`` also runs the packages ``a`` and ``a.b``. A name a
package exports lazily (``EXPORTS`` in its ``__init__``, see ``qv_jax._lazy``) is an edge to the module that
defines it, from whoever imports the name: the package itself imports nothing until the name is asked for.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qv_jax"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _lazy_exports(path: Path) -> dict[str, str]:
    """``EXPORTS`` of a package ``__init__`` (name -> defining module), or ``{}``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


EXPORTS = {name: _lazy_exports(path) for name, path in MODULES.items() if path.name == "__init__.py"}


def _with_parents(module: str, importer: str) -> set[str]:
    """``module`` and the packages above it that importing it runs (not the importer's own packages)."""
    parts = module.split(".")
    found = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in found if m in MODULES and not importer.startswith(m + ".") and m != importer}


def _edges(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qv_jax":
                    out |= _with_parents(alias.name, name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "qv_jax":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    out |= _with_parents(target, name)
                else:
                    out |= _with_parents(EXPORTS.get(base, {}).get(alias.name, base), name)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles_and_lazy_edges():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # a lazily exported name is an edge to its defining module, from the module that imports it
    assert "qv_jax.runtime.vlm" in _edges("qv_jax.videoqa", MODULES["qv_jax.videoqa"])
    assert "qv_jax.runtime.vlm" not in _edges("qv_jax.runtime", MODULES["qv_jax.runtime"])


def test_lazy_exports_name_real_definitions_and_never_a_submodule():
    for package, exports in EXPORTS.items():
        for name, module in exports.items():
            # a name equal to a submodule would be replaced by the module once anything imports that submodule
            assert f"{package}.{name}" not in MODULES, f"{package}.{name} is both an export and a module"
            assert module in MODULES, f"{package} exports {name} from {module}, which does not exist"
            tree = ast.parse(MODULES[module].read_text())
            defined = {getattr(n, "name", None) for n in tree.body} | {
                t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
            }
            assert name in defined, f"{module} does not define {name} (exported by {package})"


def test_no_module_is_longer_than_a_sitting():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_fixtures_serve_only_the_demo_and_sample_clips():
    """``qv_jax.testing`` is for tests, benchmarks, notebooks and the demo; the library proper never imports it
    (``qv_jax.video`` names ``make_sample_video`` / ``frame_number`` lazily, for users who make sample clips)."""
    users = {
        name
        for name, path in MODULES.items()
        if not name.startswith("qv_jax.testing") and any(t.startswith("qv_jax.testing") for t in _edges(name, path))
    }
    assert users == {"qv_jax.cli.demo", "qv_jax.cli.decode"}
