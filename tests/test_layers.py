"""Import layering of the package: data -> descriptors -> models -> training / gpr -> evaluation
-> active -> cli, over a foundation (errors, config, _ext, utils; then distributed).  No module imports a
higher layer or a sibling of its layer (training <-> gpr), and no import cycle exists between
modules, function-level imports included (they are how cycles hid before)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "distmlip"

# layer of a module = layer of its top folder (or file) under distmlip/
LAYER = {"errors": 0, "config": 0, "utils": 0, "_ext": 0, "distributed": 1, "data": 2,
         "descriptors": 3, "models": 4, "training": 5, "gpr": 5, "evaluation": 6,
         # active learning trains models (training) from what MD with them shows (evaluation)
         "active": 6.5,
         "calculator": 7, "cli": 7, "__main__": 7, "__init__": 7}


def _modname(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_sources() -> dict:
    """module name -> (source text, is a package __init__)."""
    return {_modname(p): (p.read_text(), p.name == "__init__.py") for p in ROOT.rglob("*.py")}


def import_edges(sources: dict) -> set:
    """(importer, imported) between the package's modules, every import statement anywhere in
    a module (function-level too); ``from pkg import name`` imports pkg (its __init__ runs) and
    pkg.name when that is a module."""
    edges = set()
    for mod, (text, is_pkg) in sources.items():
        pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(text)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    b = ".".join(base + ([node.module] if node.module else []))
                else:
                    b = node.module or ""
                targets = [b] + [b + "." + a.name for a in node.names]
            for t in targets:
                if t.startswith("distmlip") and t in sources and t != mod:
                    edges.add((mod, t))
    return edges


def violations(sources: dict) -> list[str]:
    edges = import_edges(sources)
    out = []
    for a, b in sorted(edges):
        ta, tb = _top(a), _top(b)
        if ta == tb or ta == "__init__" or b == "distmlip":
            continue
        la, lb = LAYER.get(ta, 9), LAYER.get(tb, 9)
        if lb > la:
            out.append(f"upward import: {a} -> {b}")
        elif lb == la and la == LAYER["training"]:
            out.append(f"sibling import: {a} -> {b}")
    graph = {m: sorted(b for a, b in edges if a == m) for m in sources}
    # strongly connected components (iterative Tarjan)
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    out += [f"import cycle: {' <-> '.join(sorted(c))}" for c in comps]
    return out


def test_no_upward_import_and_no_cycle():
    problems = violations(package_sources())
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_an_upward_import_and_a_cycle():
    src = package_sources()
    text, is_pkg = src["distmlip.descriptors.featurize"]
    bad = dict(src)
    bad["distmlip.descriptors.featurize"] = (text + "\n\ndef _f():\n    from ..training.config import TrainConfig\n",
                                             is_pkg)
    assert "upward import: distmlip.descriptors.featurize -> distmlip.training.config" in violations(bad)
    text, is_pkg = src["distmlip.models.activations"]
    cyc = dict(src)
    cyc["distmlip.models.activations"] = (text + "\nfrom .networks import make_mlp\n", is_pkg)
    assert any(v.startswith("import cycle:") and "distmlip.models.activations" in v and "distmlip.models.networks" in v
               for v in violations(cyc))
    sib = dict(src)
    text, is_pkg = src["distmlip.gpr.augment"]
    sib["distmlip.gpr.augment"] = (text + "\nfrom ..training.losses import loss_sums\n", is_pkg)
    assert "sibling import: distmlip.gpr.augment -> distmlip.training.losses" in violations(sib)
    up = dict(src)
    text, is_pkg = src["distmlip.evaluation.mdcheck"]
    up["distmlip.evaluation.mdcheck"] = (text + "\n\ndef _g():\n    from ..active.explore import Explorer\n", is_pkg)
    assert "upward import: distmlip.evaluation.mdcheck -> distmlip.active.explore" in violations(up)
