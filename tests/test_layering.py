"""The package layering, checked on the source: pipeline/ builds on data/ and models/, never the reverse; no import
cycles anywhere (function-local imports included, so none merely dodges a cycle); data/ holds no nn.Module."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data", "models")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            modules[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (``from a.b import c`` counts a.b, and a.b.c
    when c is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert "data.codes.reader" in graph["data.codes.order"]     # the graph sees real edges
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + (module,))}"
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, path + (module,))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_data_and_models_never_import_pipeline():
    wrong = {module: sorted(m for m in imported if m.split(".")[0] == "pipeline")
             for module, imported in _import_graph().items() if module.split(".")[0] in ("data", "models")}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_data_defines_no_nn_module():
    for path in (REPO / "data").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base) for base in node.bases}
                assert not bases & {"nn.Module", "torch.nn.Module", "Module"}, f"{path}: class {node.name}"
