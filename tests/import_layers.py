"""The import graph of the installed package, read from the sources (AST, no import), with the
setuptools package-dir mapping of pyproject.toml applied (kernels/ is trtllm_sawint4.kernels, ...).

Layers, lowest first; a module may import its own layer and the layers below, never a layer above:

    spec -> reference -> kernels -> torch ops -> cache -> integrations -> plugins -> CLI and deploy

Every import statement counts, those inside functions too (a lazy import is still a dependency).
`from P import name` is an edge to the module P.name when that is a module, else to P. A module that
reads a name of one of its own packages' __init__ (`from . import BACKENDS`) is not a circle: Python
has run that __init__ before the module anyway; such edges still obey the layers.

    python tests/import_layers.py          prints the graph (module -> what it imports) and the problems
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "trtllm_sawint4"

#: (layer, module prefixes). A prefix matches the module itself and everything below it, except the
#: bare package name (the public facade, trtllm_sawint4/__init__.py), which matches only itself.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("spec", ("trtllm_sawint4.spec", "trtllm_sawint4.quant", "trtllm_sawint4.hadamard", "trtllm_sawint4.transforms",
              "trtllm_sawint4.layout", "trtllm_sawint4.calibration", "trtllm_sawint4.symexpr",
              "trtllm_sawint4.aot_manifest")),
    ("reference", ("trtllm_sawint4.ops.reference", "trtllm_sawint4.ops.checks")),
    ("kernels", ("trtllm_sawint4.kernels",)),
    ("torch ops", ("trtllm_sawint4.ops",)),
    ("cache", ("trtllm_sawint4.allocator", "trtllm_sawint4.cache", "trtllm_sawint4")),
    ("integrations", ("trtllm_sawint4.integrations",)),
    ("plugins", ("trtllm_sawint4.plugins",)),
    ("CLI and deploy", ("trtllm_sawint4.build_scripts", "trtllm_sawint4.eval", "trtllm_sawint4.serving",
                        "trtllm_sawint4.bench",
                        "trtllm_sawint4.bench_cases", "trtllm_sawint4.cli")),
]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Installed package name -> source folder, from [tool.setuptools.package-dir]."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in cfg.items()}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file, for every .py under the mapped folders."""
    dirs = package_dirs(root)
    out: dict[str, Path] = {}
    for pkg, folder in sorted(dirs.items(), key=lambda kv: len(kv[0])):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            # a subfolder mapped to its own package (kernels/ inside trtllm_sawint4's tree) is not ours
            if any(((folder / Path(*parts[:i])).resolve() in {d.resolve() for n, d in dirs.items() if n != pkg})
                   for i in range(1, len(parts))):
                continue
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    base = importer if _is_package(importer, files) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return ".".join(p for p in (base, node.module or "") if p)


def _known(name: str, files: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    while name:
        if name in files:
            return name
        name = name.rpartition(".")[0]
    return None


@dataclass
class Edge:
    importer: str
    imported: str
    line: int
    relative_across: bool = False  #: a relative import that leaves the importer's mapped folder


@dataclass
class Graph:
    files: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)

    def targets(self, module: str) -> list[str]:
        return sorted({e.imported for e in self.edges if e.importer == module})


def build(root: Path = ROOT, files: dict[str, Path] | None = None) -> Graph:
    files = files or module_files(root)
    dirs = package_dirs(root)
    graph = Graph(files)
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        top = max((p for p in dirs if mod == p or mod.startswith(p + ".")), key=len)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known(alias.name, files) if alias.name.split(".")[0] == PACKAGE else None
                    if target:
                        graph.edges.append(Edge(mod, target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, node, files) if node.level else (node.module or "")
                if src.split(".")[0] != PACKAGE:
                    continue
                across = bool(node.level) and not (src == top or src.startswith(top + "."))
                for alias in node.names:
                    target = _known(f"{src}.{alias.name}", files) or _known(src, files)
                    if target:
                        graph.edges.append(Edge(mod, target, node.lineno, across))
    return graph


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p if p == PACKAGE else (module == p or module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring a module's imports
    of its own packages' __init__."""
    adj: dict[str, set[str]] = {m: set() for m in graph.files}
    for e in graph.edges:
        if e.imported != e.importer and e.imported not in _ancestors(e.importer):
            adj[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 10 * len(adj)))
    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def problems(graph: Graph) -> list[str]:
    """Every rule broken: modules without a layer, upward edges, circles, relative imports that cross
    a mapped folder (write those as absolute `trtllm_sawint4....`)."""
    out = [f"{m}: no layer (add it to tests/import_layers.py LAYERS)" for m in graph.files if layer_of(m) is None]
    for e in graph.edges:
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is not None and b is not None and b > a:
            out.append(f"upward: {e.importer} ({LAYERS[a][0]}) imports {e.imported} ({LAYERS[b][0]}) "
                       f"at {graph.files[e.importer].relative_to(ROOT)}:{e.line}")
        if e.relative_across:
            out.append(f"relative import across a mapped folder: {e.importer} -> {e.imported} "
                       f"at {graph.files[e.importer].relative_to(ROOT)}:{e.line}")
    out += [f"circle: {' -> '.join(c)}" for c in cycles(graph)]
    return list(dict.fromkeys(out))


def render(graph: Graph) -> str:
    lines = []
    for i, (name, _) in enumerate(LAYERS):
        mods = [m for m in sorted(graph.files) if layer_of(m) == i]
        lines.append(f"[{i}] {name}")
        for m in mods:
            short = lambda x: x.removeprefix(PACKAGE + ".") if x != PACKAGE else "(trtllm_sawint4)"  # noqa: E731
            lines.append(f"    {short(m)} -> {', '.join(short(t) for t in graph.targets(m) if t != m) or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    ROOT = root
    g = build(root)
    print(render(g))
    found = problems(g)
    print(f"\n{len(found)} problem(s)")
    for p in found:
        print("  " + p)
