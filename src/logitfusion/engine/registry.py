"""The solver registry and the one method grammar: every solver kind is declared here once.

A kind is its name, how its method string is parsed into a solver (the builder: a recipe's
solver section is built through the same parser), how a recipe's solver section is written as
a method string, and what it demands of a recipe. generate, eval, recipes, the Python API and
the server all read this table, so adding a solver is a class in solvers.py plus one
`register(SolverKind(...))` below. What a method string leaves out (grid, strategy, a_max, the
delta's strength) travels as one `SearchConfig`, from the CLI, eval, a recipe or the server.

Method grammar: KIND or KIND:ARG. Values inside ARG are separated by "," or "+" (the same
thing: "+" exists because eval's --methods is itself a comma-separated list), so
static:0.5,1.5 and static:0.5+1.5 are one method; a "+" that is a sign (1e+38, +1.5) stays one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from .limits import MAX_WEIGHT
from .solvers import Alone, Delta, Dynamic, Solver, SolverError, Static, parse_grid


@dataclass(frozen=True)
class SearchConfig:
    """The solver-search settings a method string leaves out, declared once. The CLI (--grid,
    --strategy), eval's model_args, a recipe's solver section (`Recipe.search`) and the server
    hand one of these to the solver builder; None falls back to the next default (a recipe's,
    then the solver's own)."""

    grid: tuple[float, ...] | None = None  # the weights dynamic fusion searches (solver default 0:2:0.1)
    strategy: str | None = None  # several experts: fast | joint (solver default fast)
    a_max: float | None = None  # box of the continuous joint solver (solver default max(grid))
    delta_strength: float | None = None  # delta's a when the method gives none (default 1)

    def __post_init__(self):
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(float(a) for a in self.grid))

    @classmethod
    def parse(cls, grid=None, strategy: str | None = None, a_max=None) -> "SearchConfig":
        """From a front end's values: grid as text (0:2:0.1, or values 0,0.5,1), a number or a list;
        an empty strategy is none."""
        if isinstance(grid, str):
            grid = parse_grid(grid)
        elif isinstance(grid, (int, float)):
            grid = [float(grid)]
        return cls(grid, strategy or None, None if a_max is None else float(a_max))

    def over(self, defaults: "SearchConfig") -> "SearchConfig":
        """These settings, with those of `defaults` where these are None."""
        return SearchConfig(**{f.name: getattr(defaults, f.name) if getattr(self, f.name) is None
                               else getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class MethodContext:
    """What a method string may leave out: the experts it may name and the search settings."""

    expert_names: Sequence[str]
    search: SearchConfig = SearchConfig()


@dataclass(frozen=True)
class SolverKind:
    name: str
    syntax: str  # the method grammar of this kind, for messages: "static[:a,...]"
    parse: Callable[[str, str, MethodContext], Solver]  # (arg, whole spec, context) -> checked solver
    # The recipe's solver section as this kind's method argument ("" for none); the Recipe is
    # duck-typed so that the engine's recipe module can import this one.
    recipe_arg: Callable[[Any], str] = lambda recipe: ""
    # What this kind needs of a validated recipe: a problem sentence, or None.
    check_recipe: Callable[[Any], str | None] = lambda recipe: None
    fuses_experts: bool = False  # weighs experts, so it may run on a subset of them (server fusion.experts)


_KINDS: dict[str, SolverKind] = {}


def register(kind: SolverKind) -> SolverKind:
    if kind.name in _KINDS:
        raise ValueError(f"solver kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_KINDS)


def get(name: str) -> SolverKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise SolverError(f"unknown solver kind {name!r}; use {', '.join(_KINDS)}") from None


def expert_subset_kinds() -> tuple[str, ...]:
    """The kinds that weigh experts, and so may fuse a subset of them (the server's fusion.experts)."""
    return tuple(k.name for k in _KINDS.values() if k.fuses_experts)


def grammar() -> str:
    return ", ".join(k.syntax for k in _KINDS.values())


# "+" after a digit or a point ends a value; elsewhere it is a sign: 1e+38, +1.5.
_PLUS_SEPARATOR = re.compile(r"(?<=[0-9.])\+")


def split_method(spec: str) -> tuple[str, str]:
    """(kind, argument) of a method string, with a "+" that separates values read as ","."""
    kind, _, arg = spec.strip().partition(":")
    return kind, _PLUS_SEPARATOR.sub(",", arg)


def parse_method(spec: str, expert_names: Sequence[str], search: SearchConfig | None = None) -> Solver:
    """A solver from a method string, with `search` for what it leaves out:

    "large" | "expert" (the first expert) | "expert:NAME" | "static" (a = 1) | "static:0.5" |
    "static:0.5,1.0" or "static:0.5+1.0" (one per expert) | "dynamic" | "dynamic:fast" |
    "dynamic:joint" | "delta" (search.delta_strength, else 1) | "delta:0.5"
    """
    name, arg = split_method(spec)
    kind = _KINDS.get(name)
    if kind is None:
        raise SolverError(f"unknown method {spec!r}; use {grammar()}")
    return kind.parse(arg, spec, MethodContext(list(expert_names), search or SearchConfig()))


def recipe_method(recipe) -> str:
    """A recipe's solver section as a method string (so that method options can apply to it)."""
    kind = get(recipe.solver.kind)
    arg = kind.recipe_arg(recipe)
    return f"{kind.name}:{arg}" if arg else kind.name


def check_recipe(recipe) -> str | None:
    return get(recipe.solver.kind).check_recipe(recipe)


# ---------------------------------------------------------------- the kinds

def _floats(arg: str, problem: str) -> list[float]:
    try:
        return [float(w) for w in arg.split(",")]
    except ValueError:
        raise SolverError(problem) from None


def _checked(solver: Solver, ctx: MethodContext) -> Solver:
    solver.check(len(ctx.expert_names))
    return solver


def _needs_experts(recipe) -> str | None:
    if not recipe.experts:
        return f"solver kind {recipe.solver.kind!r} needs at least one expert (or use kind: large)"
    return None


def _parse_dynamic(arg: str, spec: str, ctx: MethodContext) -> Solver:
    search = ctx.search
    kwargs = {"grid": list(search.grid)} if search.grid is not None else {}
    return _checked(Dynamic(strategy=arg or search.strategy or "fast", a_max=search.a_max, **kwargs), ctx)


def _parse_static(arg: str, spec: str, ctx: MethodContext) -> Solver:
    weights = _floats(arg, f"bad weights in {spec!r}; write e.g. static:1.0 or static:0.5,1.5") if arg else [1.0]
    return _checked(Static(weights), ctx)


def _check_static(recipe) -> str | None:
    weights, n = recipe.solver.weights, len(recipe.experts)
    if len(weights) not in (1, n):
        return (f"solver.weights has {len(weights)} values for {n} experts; give one per expert or one "
                "for all")
    return None


def _parse_large(arg: str, spec: str, ctx: MethodContext) -> Solver:
    if arg:
        raise SolverError(f"unknown method {spec!r}; use {grammar()}")
    return Alone("large")


def _parse_expert(arg: str, spec: str, ctx: MethodContext) -> Solver:
    names = list(ctx.expert_names)
    if not names:
        raise SolverError("method 'expert' needs at least one expert")
    name = arg or names[0]
    if name not in names:
        raise SolverError(f"unknown expert {name!r} in method {spec!r}; experts: {names}")
    return Alone("expert", names.index(name))


def _check_expert(recipe) -> str | None:
    names = [e.name for e in recipe.experts]
    if recipe.solver.expert not in names:
        return f"solver.expert {recipe.solver.expert!r} is not one of the experts {names}"
    return None


def _parse_delta(arg: str, spec: str, ctx: MethodContext) -> Solver:
    if arg:
        problem = f"bad strength in {spec!r}; write e.g. delta or delta:0.5"
        strength = _floats(arg, problem)
        if len(strength) != 1:
            raise SolverError(problem)
        strength = strength[0]
    else:
        strength = 1.0 if ctx.search.delta_strength is None else ctx.search.delta_strength
    solver = _checked(Delta(strength), ctx)
    if abs(solver.strength) > MAX_WEIGHT:  # overflows the fused logits, as a weight would
        raise SolverError(f"delta strength must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, got {solver.strength}")
    return solver


def _check_delta(recipe) -> str | None:
    if recipe.delta is None:
        return "solver kind 'delta' needs a `delta` section: {path: DELTA_MODEL, strength: 1.0}"
    return None


# Registration order is the order of messages ("unknown method ...; use large, expert[:NAME], ...").
register(SolverKind("large", "large", _parse_large))
register(SolverKind("expert", "expert[:NAME]", _parse_expert, recipe_arg=lambda r: r.solver.expert or "",
                    check_recipe=_check_expert))
register(SolverKind("static", "static[:a,...]", _parse_static,
                    recipe_arg=lambda r: ",".join(str(w) for w in r.solver.weights),
                    check_recipe=lambda r: _needs_experts(r) or _check_static(r), fuses_experts=True))
register(SolverKind("dynamic", "dynamic[:fast|joint]", _parse_dynamic, check_recipe=_needs_experts,
                    fuses_experts=True))
register(SolverKind("delta", "delta[:a]", _parse_delta, check_recipe=_check_delta))
