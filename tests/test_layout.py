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
