"""No import cycles among fiarse_jax's modules.

Every import counts, at module level or inside a function (a function-level import only
defers a cycle), except under ``if TYPE_CHECKING:``; a ``"fiarse_jax.module:function"``
string (a lazily imported loader, as in ``data.registry``) counts as an import too.
``from package import name`` is an import of ``package.name`` when that is a module, else
of ``package`` (its ``__init__``).
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fiarse_jax"
LAZY = re.compile(r"(fiarse_jax(?:\.\w+)+):\w+")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that module ``name`` (file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            nodes = node.orelse
        else:
            nodes = list(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                             for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = LAZY.fullmatch(node.value)
                if m:
                    found.add(m.group(1))
        for child in nodes:
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out = set()
    for target in found:   # ``import a.b.c`` of a name that is no module: its package
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for group in groups:   # breadth-first from the group's first module back to itself
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                out.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(out)


def _show(found: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_graph_sees_function_level_and_lazy_imports():
    graph = import_graph()
    assert "fiarse_jax.data.types" in graph["fiarse_jax.data.federation"]
    assert "fiarse_jax.data.cifar" in graph["fiarse_jax.data.registry"]   # a "module:function"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_data_has_no_import_cycle():
    found = [c for c in cycles(import_graph()) if any(m.startswith("fiarse_jax.data") for m in c)]
    assert not found, _show(found)


def test_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, _show(found)


#: The layers, lowest first: a module imports only modules of its own layer or lower ones.
LAYERS = [("utils",), ("core",), ("data", "models", "policies"), ("robust",), ("federated",),
          ("experiment",), ("cli",)]


def layer(module: str) -> int | None:
    """``module``'s index in ``LAYERS`` (None for the package's root modules)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits in a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))


def test_every_module_of_the_package_is_in_a_layer():
    top = sorted(m for m in import_graph() if m.count(".") == 1 and layer(m) is None)
    assert top == ["fiarse_jax.__main__"], top   # the root __init__ is "fiarse_jax" itself
    assert upward_imports({"fiarse_jax.core.masks": {"fiarse_jax.cli.main"},
                           "fiarse_jax.cli.main": {"fiarse_jax.core.masks"}}) == [
        ("fiarse_jax.core.masks", "fiarse_jax.cli.main")]


def test_each_layer_imports_only_its_own_and_lower_layers():
    found = upward_imports(import_graph())
    assert not found, "imports of a higher layer:\n" + "\n".join(f"{a} -> {b}" for a, b in found)


#: The experiment layer is the boundary: below it no module sees a ``ConfigDict``.
BOUNDARY = next(i for i, names in enumerate(LAYERS) if "experiment" in names)


def config_readers(name: str, path: Path) -> list[str]:
    """Where module ``name`` imports ``ml_collections`` or takes a ``config`` argument."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [f"{name}: imports {m}" for m in mods if (m or "").startswith("ml_collections")]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = node.args
            found += [f"{name}: {getattr(node, 'name', 'lambda')}({arg.arg})"
                      for arg in a.posonlyargs + a.args + a.kwonlyargs if arg.arg == "config"]
    return found


def test_below_the_experiment_layer_nothing_reads_a_config(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("import ml_collections\ndef f(x, config): pass\n")
    assert config_readers("m", probe) == ["m: imports ml_collections", "m: f(config)"]
    found = [r for name, path in modules().items()
             if layer(name) is not None and layer(name) < BOUNDARY
             for r in config_readers(name, path)]
    assert not found, "\n".join(found)
