"""No import cycles among dvpvae's modules (tests/kernels/test_package.py checks that
kernels/ never imports the package)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path: str) -> set[str]:
    """dvpvae modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("dvpvae."))
    return found


def _package_graph() -> dict[str, set[str]]:
    folder = os.path.join(ROOT, "dvpvae")
    modules = {f"dvpvae.{f[:-3]}" for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    return {m: {i for i in _imports(os.path.join(folder, m.split(".")[1] + ".py")) if i in modules} - {m}
            for m in modules}


def test_dvpvae_modules_have_no_import_cycle():
    graph = _package_graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for dep in graph[m]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
