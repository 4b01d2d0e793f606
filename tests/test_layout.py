"""The tree's import graph: no module imports, directly or through others, a module that imports it back
(a circle makes one of them half-initialised while the other runs, and their order of reading unclear).
Function-level imports count too. The modules are the top level's and bench/'s; tests/ may import anything."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imports_of(path):
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def graph():
    """{module: the project's modules it imports}; bench/'s tools see the top level and bench/ (their
    script folder), the top level sees itself."""
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    bench = {f[:-3] for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py")}
    g = {}
    for folder, mods, visible in (("", top, top), ("bench", bench, top | bench)):
        for m in mods:
            key = f"{folder}/{m}" if folder else m
            deps = imports_of(os.path.join(ROOT, folder, m + ".py")) & visible
            g[key] = {f"bench/{d}" if folder and d in bench else d for d in deps if d != m}
    return g


def test_no_import_circles():
    g = graph()
    assert "model" in g and "bench/vs_transformers" in g
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_the_method_does_not_import_the_toy_world_or_the_tools():
    """model.py and losses.py read without the toy world, evaluation or bench/ (STYLE: the paper's path reads
    without the toy world); model.py does not import its loaders or the decoding engine."""
    g = graph()
    assert not g["model"] & {"weights", "inference", "shapes", "losses", "train"}, g["model"]
    assert g["losses"] <= {"fused_losses"}, g["losses"]
    assert g["fused_losses"] == set(), g["fused_losses"]
