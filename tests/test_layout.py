"""The house rules of issue 15, checked: the engine never imports a front end or the bench, no
module over 600 lines, no function over 80 lines, no block of 6 lines repeated in src."""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "logitfusion"
MODULES = sorted(SRC.rglob("*.py"))
MAX_MODULE, MAX_FUNCTION, MIN_DUPLICATE = 600, 80, 6


def _imported(path: Path) -> set[str]:
    """Absolute dotted names a module imports (relative imports resolved)."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted((SRC / "engine").glob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_no_front_end_and_no_bench(path):
    outside = ("logitfusion.bench", "logitfusion.serve", "logitfusion.eval", "logitfusion.train",
               "logitfusion.cli", "logitfusion.plotting")
    assert not [n for n in _imported(path) if n.startswith(outside)]


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE}
    assert not long, f"split these modules (over {MAX_MODULE} lines): {long}"


def test_no_function_over_80_lines():
    long = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long.append(f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"split these functions (over {MAX_FUNCTION} lines): {long}"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of lines that carry code: blank lines, comments, docstring-free
    punctuation such as a lone `)` are left out so that they cannot make a block look repeated."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and s.strip(")]}:,") and not s.startswith(("import ", "from ")):
            out.append((i, s))
    return out


def test_no_block_of_six_lines_repeated_in_src():
    seen: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)  # window -> (module, index)
    where: dict[tuple[str, int], int] = {}  # (module, index of a code line) -> line number
    for p in MODULES:
        lines, name = _code_lines(p), str(p.relative_to(SRC))
        for k in range(len(lines) - MIN_DUPLICATE + 1):
            seen[tuple(s for _, s in lines[k:k + MIN_DUPLICATE])].append((name, k))
            where[(name, k)] = lines[k][0]
    repeated = {tuple(places) for places in seen.values() if len(places) > 1}
    # a block of n repeated code lines is n - 5 overlapping windows: report the first of each
    first = [places for places in repeated if tuple((m, k - 1) for m, k in places) not in repeated]
    blocks = sorted(" ~ ".join(f"{m}:{where[(m, k)]}" for m, k in places) for places in first)
    assert not blocks, f"{len(blocks)} blocks of {MIN_DUPLICATE}+ code lines repeated; factor them out: {blocks[:10]}"


# ---------------------------------------------------------------- imports: no cycle, no import up the layers

PACKAGE = SRC.name
# engine < serve / vllm / eval / train (and plotting, which draws what the engine returns) < bench
# < cli. The package's own __init__ re-exports the engine: it sits with it.
LAYERS = {"engine": 0, "__init__": 0, "serve": 1, "vllm": 1, "eval": 1, "train": 1, "plotting": 1, "testing": 1, "bench": 2,
          "cli": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {_module_name(p): p for p in MODULES}


def _own(name: str) -> str | None:
    """The package's module that an imported dotted name reaches (its longest prefix that is one)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULE_NAMES:
            return ".".join(parts)
        parts.pop()
    return None


def _edges(path: Path) -> set[str]:
    """The package's modules that a module imports, anywhere in it (function bodies and
    `if TYPE_CHECKING:` blocks included). `from .x import y` imports x.y where y is a module."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULE_NAMES else module for a in node.names]
        else:
            continue
        out |= {m for n in names if (m := _own(n)) is not None}
    return out - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    return {name: _edges(path) for name, path in MODULE_NAMES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_the_import_graph_is_read_right():
    graph = _graph()
    assert f"{PACKAGE}.engine.decoding" in graph[f"{PACKAGE}.engine.fuser"]  # from .decoding import ...
    assert f"{PACKAGE}.engine.limits" in graph[f"{PACKAGE}.cli.generate"]  # from ..engine import limits
    assert f"{PACKAGE}.serve.app" in graph[f"{PACKAGE}.serve"]  # a package's __init__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert set(LAYERS) >= {n.split(".")[1] for n in graph if "." in n}, "give every top-level module a layer"


def test_no_import_cycle_in_src():
    """Type-only imports (under TYPE_CHECKING) and imports inside functions count: a cycle is a
    pair of modules that cannot be understood (or split) apart."""
    cycles = _cycles(_graph())
    assert not cycles, f"{len(cycles)} import cycles: {cycles}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    """engine < serve / vllm / eval / train / plotting < bench < cli; a module imports its own layer or below."""
    up = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a))
    assert not up, f"{len(up)} imports run up the layers: {up}"
