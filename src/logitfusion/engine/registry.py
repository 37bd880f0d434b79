"""The solver registry and the one method grammar: every solver kind is declared here once.

A kind is a typed spec (a pydantic model, `SolverSpec`, discriminated on `kind`): its settings as
a recipe's `solver:` section writes them, how its method string (the short form of the CLI, eval
and the server) reads into the same spec (`from_method`), what it needs of a recipe
(`recipe_problem`) and the solver it builds (`build`). generate, eval, recipes, the Python API
and the server all read this table, so adding a kind is one spec class and one `register(...)`
(tests/test_registry.py adds one in a test module and runs it through every front end). What a
method string leaves out (grid, strategy, a_max, the delta's strength) travels as one
`SearchConfig`, from the CLI, eval, a recipe or the server.

Method grammar: KIND or KIND:ARG. Values inside ARG are separated by "," or "+" (the same
thing: "+" exists because eval's --methods is itself a comma-separated list), so
static:0.5,1.5 and static:0.5+1.5 are one method; a "+" that is a sign (1e+38, +1.5) stays one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import limits
from .errors import SolverError
from .solvers import Alone, Delta, Dynamic, Solver, Static, check_grid, make_grid, parse_grid


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


class SolverSpec(BaseModel):
    """A solver kind's settings, as a recipe's `solver:` section writes them. Subclasses set `kind`
    (a Literal), `syntax` and, as needed, `needs`, `fuses_experts`, `from_method`, `recipe_problem`."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    syntax: ClassVar[str] = ""  # the method grammar of this kind, for messages: "static[:a,...]"
    needs: ClassVar[frozenset[str]] = frozenset()  # member kinds a recipe must have: "expert", "delta"
    fuses_experts: ClassVar[bool] = False  # weighs experts, so may run on a subset (server fusion.experts)

    @classmethod
    def from_method(cls, arg: str, method: str, ctx: MethodContext) -> "SolverSpec":
        """This kind's spec from the argument of a method string (after "KIND:")."""
        if arg:
            raise SolverError(f"unknown method {method!r} ({cls.model_fields['kind'].default} takes no argument); "
                              f"use {grammar()}", field="solver")
        return cls()

    def build(self, ctx: MethodContext) -> Solver:
        raise NotImplementedError

    def recipe_problem(self, expert_names: Sequence[str], has_delta: bool) -> str | None:
        """What this kind lacks in a recipe (a problem sentence), or None."""
        if "expert" in self.needs and not expert_names:
            return f"solver kind {self.kind!r} needs at least one expert (or use kind: large)"
        if "delta" in self.needs and not has_delta:
            return f"solver kind {self.kind!r} needs a `delta` section: {{path: DELTA_MODEL, strength: 1.0}}"
        return None

    def method(self) -> str:
        """The short form, for what a server answer or a table reports ("static:0.5,1.5")."""
        return self.kind


_KINDS: dict[str, type[SolverSpec]] = {}


def register(spec: type[SolverSpec]) -> type[SolverSpec]:
    """Declare a solver kind (a SolverSpec subclass whose `kind` is a Literal with a default)."""
    name = spec.model_fields["kind"].default
    if not isinstance(name, str) or not name:
        raise ValueError(f"{spec.__name__}: kind must be a Literal with a default, e.g. kind: Literal['x'] = 'x'")
    if name in _KINDS:
        raise ValueError(f"solver kind {name!r} is already registered")
    _KINDS[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a kind (tests that register their own)."""
    _KINDS.pop(name, None)


def kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_KINDS)


def get(name: str) -> type[SolverSpec]:
    try:
        return _KINDS[name]
    except KeyError:
        raise SolverError(f"unknown solver kind {name!r}; use {', '.join(_KINDS)}", field="solver") from None


def expert_subset_kinds() -> tuple[str, ...]:
    """The kinds that weigh experts, and so may fuse a subset of them (the server's fusion.experts)."""
    return tuple(name for name, k in _KINDS.items() if k.fuses_experts)


def grammar() -> str:
    return ", ".join(k.syntax or name for name, k in _KINDS.items())


def spec_of(data: Any) -> SolverSpec:
    """A recipe's `solver:` section (a mapping; kind defaults to dynamic) as its kind's spec."""
    if isinstance(data, SolverSpec):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"must be a mapping such as {{kind: dynamic}}, got {type(data).__name__}")
    kind = _Kind.model_validate({"kind": data.get("kind", "dynamic")}).kind  # a bad kind: solver.kind
    return _KINDS[kind].model_validate({**data, "kind": kind})


class _Kind(BaseModel):
    kind: Any

    @field_validator("kind")
    @classmethod
    def _registered(cls, v):
        if not isinstance(v, str) or v not in _KINDS:
            raise ValueError(f"unknown solver kind {v!r}; use one of {', '.join(_KINDS)}")
        return v


# "+" after a digit or a point ends a value; elsewhere it is a sign: 1e+38, +1.5.
_PLUS_SEPARATOR = re.compile(r"(?<=[0-9.])\+")


def split_method(spec: str) -> tuple[str, str]:
    """(kind, argument) of a method string, with a "+" that separates values read as ","."""
    kind, _, arg = spec.strip().partition(":")
    return kind, _PLUS_SEPARATOR.sub(",", arg)


def method_spec(method: str, expert_names: Sequence[str], search: SearchConfig | None = None) -> SolverSpec:
    """The spec a method string stands for (the same spec a recipe section would give)."""
    if not isinstance(method, str):
        raise SolverError(f"a method must be a string such as 'dynamic', got {type(method).__name__}", field="solver")
    name, arg = split_method(method)
    kind = _KINDS.get(name)
    if kind is None:
        raise SolverError(f"unknown method {method!r}; use {grammar()}", field="solver")
    if ":" in method and not arg.strip():
        raise SolverError(f"method {method!r} ends in ':' with nothing after it; write {kind.syntax or name}",
                          field="solver")
    ctx = MethodContext(list(expert_names), search or SearchConfig())
    try:
        return kind.from_method(arg, method, ctx)
    except SolverError:
        raise
    except ValidationError as e:
        raise SolverError(f"method {method!r}: {_first_message(e)}", field="solver") from None
    except ValueError as e:  # a kind's own parsing (float("x")...): still this method's error, by name
        raise SolverError(f"bad argument in method {method!r} ({e}); write {kind.syntax or name}",
                          field="solver") from None


def build(spec: SolverSpec, expert_names: Sequence[str], search: SearchConfig | None = None) -> Solver:
    """The solver a spec describes, checked against the experts it may weigh."""
    ctx = MethodContext(list(expert_names), search or SearchConfig())
    solver = spec.build(ctx)
    solver.check(len(ctx.expert_names))
    return solver


def parse_method(method: str, expert_names: Sequence[str], search: SearchConfig | None = None) -> Solver:
    """A solver from a method string, with `search` for what it leaves out:

    "large" | "expert" (the first expert) | "expert:NAME" | "static" (a = 1) | "static:0.5" |
    "static:0.5,1.0" or "static:0.5+1.0" (one per expert) | "dynamic" | "dynamic:fast" |
    "dynamic:joint" | "delta" (search.delta_strength, else 1) | "delta:0.5"
    """
    return build(method_spec(method, expert_names, search), expert_names, search)


def _first_message(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error":  # pydantic's own words do not name the setting
        msg = ".".join(str(x) for x in err["loc"]) + ": " + msg
    return msg


def _floats(arg: str, problem: str) -> list[float]:
    try:
        return [float(w) for w in arg.split(",")]
    except ValueError:
        raise SolverError(problem, field="solver") from None


# ---------------------------------------------------------------- the kinds

class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: float = 0.0
    stop: float = 2.0
    step: float = Field(0.1, gt=0)

    def values(self) -> list[float]:
        return make_grid(self.start, self.stop, self.step)


class LargeSpec(SolverSpec):
    """The large model alone."""

    kind: Literal["large"] = "large"
    syntax: ClassVar[str] = "large"

    def build(self, ctx: MethodContext) -> Solver:
        return Alone("large")


class ExpertSpec(SolverSpec):
    """One expert alone (the first when none is named)."""

    kind: Literal["expert"] = "expert"
    expert: str | None = None
    syntax: ClassVar[str] = "expert[:NAME]"
    needs: ClassVar[frozenset[str]] = frozenset({"expert"})

    @classmethod
    def from_method(cls, arg, method, ctx):
        return cls(expert=arg or None)

    def build(self, ctx: MethodContext) -> Solver:
        names = list(ctx.expert_names)
        if not names:
            raise SolverError("method 'expert' needs at least one expert", field="solver")
        name = self.expert or names[0]
        if name not in names:
            raise SolverError(f"unknown expert {name!r} in method {self.method()!r}; experts: {names}", field="solver")
        return Alone("expert", names.index(name))

    def recipe_problem(self, expert_names, has_delta):
        if self.expert not in expert_names:
            return f"solver.expert {self.expert!r} is not one of the experts {list(expert_names)}"
        return None

    def method(self) -> str:
        return f"expert:{self.expert}" if self.expert else "expert"


class StaticSpec(SolverSpec):
    """Fixed weights: one per expert, or one for all (proxy-tuning is one expert at a = 1)."""

    kind: Literal["static"] = "static"
    weights: list[float] = [1.0]
    syntax: ClassVar[str] = "static[:a,...]"
    needs: ClassVar[frozenset[str]] = frozenset({"expert"})
    fuses_experts: ClassVar[bool] = True

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        problem = limits.weight_problem("static weights", v) if v else \
            "static weights: none given; give one weight per expert, or one for all"
        if problem:
            raise ValueError(problem)
        return v

    @classmethod
    def from_method(cls, arg, method, ctx):
        if not arg:
            return cls()
        return cls(weights=_floats(arg, f"bad weights in {method!r}; write e.g. static:1.0 or static:0.5,1.5"))

    def build(self, ctx: MethodContext) -> Solver:
        return Static(list(self.weights))

    def recipe_problem(self, expert_names, has_delta):
        n = len(expert_names)
        if n and len(self.weights) not in (1, n):
            return (f"solver.weights has {len(self.weights)} values for {n} experts; give one per expert or one "
                    "for all")
        return super().recipe_problem(expert_names, has_delta)

    def method(self) -> str:
        return "static:" + ",".join(str(w) for w in self.weights)


class DynamicSpec(SolverSpec):
    """Per-step, per-sequence weights by KL matching (method.md §3-4)."""

    kind: Literal["dynamic"] = "dynamic"
    grid: GridSpec | list[float] = GridSpec()
    strategy: Literal["fast", "joint"] = "fast"
    a_max: float | None = Field(None, gt=0, le=limits.MAX_WEIGHT)
    syntax: ClassVar[str] = "dynamic[:fast|joint]"
    needs: ClassVar[frozenset[str]] = frozenset({"expert"})
    fuses_experts: ClassVar[bool] = True

    def grid_values(self) -> list[float]:
        return self.grid.values() if isinstance(self.grid, GridSpec) else [float(a) for a in self.grid]

    @model_validator(mode="after")
    def _grid(self):
        try:
            grid = self.grid_values()
            check_grid(grid, self.a_max if self.a_max is not None else max(grid, default=0.0))
        except SolverError as e:
            raise ValueError(str(e)) from None
        return self

    @classmethod
    def from_method(cls, arg, method, ctx):
        if arg not in ("", "fast", "joint"):
            raise SolverError(f"unknown dynamic strategy {arg!r} in {method!r}; use 'fast' or 'joint' "
                              f"({grammar()})", field="solver")
        search = ctx.search
        grid = {"grid": list(search.grid)} if search.grid is not None else {}
        return cls(strategy=arg or search.strategy or "fast", a_max=search.a_max, **grid)

    def build(self, ctx: MethodContext) -> Solver:
        return Dynamic(self.grid_values(), strategy=self.strategy, a_max=self.a_max)

    def search(self) -> SearchConfig:
        return SearchConfig(tuple(self.grid_values()), self.strategy, self.a_max)

    def method(self) -> str:
        return f"dynamic:{self.strategy}" if self.strategy != "fast" else "dynamic"


class DeltaSpec(SolverSpec):
    """Cross-model control: the recipe's delta model on the large model, at `strength` (default:
    the delta section's)."""

    kind: Literal["delta"] = "delta"
    strength: float | None = None
    syntax: ClassVar[str] = "delta[:a]"
    needs: ClassVar[frozenset[str]] = frozenset({"delta"})

    @field_validator("strength")
    @classmethod
    def _bounded(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and abs(v) <= limits.MAX_WEIGHT):  # overflows, as a weight would
            raise ValueError(f"delta strength must be between -{limits.MAX_WEIGHT:g} and {limits.MAX_WEIGHT:g}, "
                             f"got {v}")
        return v

    @classmethod
    def from_method(cls, arg, method, ctx):
        if not arg:
            return cls(strength=ctx.search.delta_strength)
        strength = _floats(arg, f"bad strength in {method!r}; write e.g. delta or delta:0.5")
        if len(strength) != 1:
            raise SolverError(f"bad strength in {method!r}; write e.g. delta or delta:0.5", field="solver")
        return cls(strength=strength[0])

    def build(self, ctx: MethodContext) -> Solver:
        strength = self.strength if self.strength is not None else ctx.search.delta_strength
        return Delta(1.0 if strength is None else strength)

    def method(self) -> str:
        return "delta" if self.strength is None else f"delta:{self.strength}"


# Registration order is the order of messages ("unknown method ...; use large, expert[:NAME], ...").
for _spec in (LargeSpec, ExpertSpec, StaticSpec, DynamicSpec, DeltaSpec):
    register(_spec)


# ---------------------------------------------------------------- rules beyond the paper (issue 24, rules.py)
# Each takes a linear base rule (static or dynamic; the recipe's `base: {kind: ...}`, or the rest of
# the method string after its settings): plausible:expert:0.1:static:1.0, nudge:0.3, keep:0.1:0.1:dynamic,
# route:0:static:1.0. Settings are separated by ':' so that eval's comma-separated --methods can hold them.

from typing import Annotated, Union  # noqa: E402

from . import rules  # noqa: E402

Base = Annotated[Union[StaticSpec, DynamicSpec], Field(discriminator="kind")]


def _split_base(arg: str, method: str, ctx: MethodContext, settings: int) -> tuple[list[str], SolverSpec | None]:
    """(up to `settings` leading values, the base rule's spec or None) of a method's argument."""
    parts = arg.split(":") if arg else []
    at = next((i for i, p in enumerate(parts) if p in ("static", "dynamic")), len(parts))
    head, base = parts[:at], ":".join(parts[at:])
    if len(head) > settings or any(not p for p in head):
        raise SolverError(f"bad settings in {method!r}; write {get(method.partition(':')[0]).syntax}", field="solver")
    return head, (method_spec(base, ctx.expert_names, ctx.search) if base else None)


def _number(text: str, method: str) -> float:
    (value,) = _floats(text, f"bad number {text!r} in {method!r}")
    return value


class _Based(SolverSpec):
    """A rule over a linear base rule (static or dynamic)."""

    base: Base = DynamicSpec()
    needs: ClassVar[frozenset[str]] = frozenset({"expert"})
    fuses_experts: ClassVar[bool] = True

    def recipe_problem(self, expert_names, has_delta):
        return self.base.recipe_problem(expert_names, has_delta) or super().recipe_problem(expert_names, has_delta)

    def search(self) -> SearchConfig:
        return self.base.search() if isinstance(self.base, DynamicSpec) else SearchConfig()

    def method(self) -> str:
        values = [getattr(self, name) for name in self._settings]
        return ":".join([self.kind, *(v if isinstance(v, str) else f"{v:g}" for v in values), self.base.method()])

    @classmethod
    def from_method(cls, arg, method, ctx):
        head, base = _split_base(arg, method, ctx, len(cls._settings))
        values = {name: (text if name == "by" else _number(text, method)) for name, text in zip(cls._settings, head)}
        return cls(**values, **({"base": base} if base is not None else {}))


class PlausibleSpec(_Based):
    """A linear rule restricted to the tokens with at least alpha x the top probability under `by`."""

    kind: Literal["plausible"] = "plausible"
    by: Literal["expert", "large", "small", "either"] = "expert"
    alpha: float = Field(0.1, gt=0, le=1)
    syntax: ClassVar[str] = "plausible[:BY[:ALPHA]][:static|dynamic...]"
    _settings: ClassVar[tuple[str, ...]] = ("by", "alpha")

    def build(self, ctx: MethodContext) -> Solver:
        return rules.Plausible(self.base.build(ctx), self.by, self.alpha)


class NudgeSpec(_Based):
    """Token-level nudging: the large model where its top probability is >= gamma, else the (first)
    expert alone (base: none) or a linear rule."""

    kind: Literal["nudge"] = "nudge"
    gamma: float = Field(0.3, gt=0, le=1)
    base: Base | None = None
    syntax: ClassVar[str] = "nudge[:GAMMA][:static|dynamic...]"
    _settings: ClassVar[tuple[str, ...]] = ("gamma",)

    def recipe_problem(self, expert_names, has_delta):
        return SolverSpec.recipe_problem(self, expert_names, has_delta) if self.base is None else \
            super().recipe_problem(expert_names, has_delta)

    def search(self) -> SearchConfig:
        return SearchConfig() if self.base is None else super().search()

    def method(self) -> str:
        return f"nudge:{self.gamma:g}" + ("" if self.base is None else ":" + self.base.method())

    def build(self, ctx: MethodContext) -> Solver:
        return rules.Nudge(self.gamma, None if self.base is None else self.base.build(ctx))


class KeepSpec(_Based):
    """The large model decodes unless the experts find its top token implausible (beta); there, a
    linear rule restricted to the experts' plausible set (alpha)."""

    kind: Literal["keep"] = "keep"
    beta: float = Field(0.1, gt=0, le=1)
    alpha: float = Field(0.1, gt=0, le=1)
    syntax: ClassVar[str] = "keep[:BETA[:ALPHA]][:static|dynamic...]"
    _settings: ClassVar[tuple[str, ...]] = ("beta", "alpha")

    def build(self, ctx: MethodContext) -> Solver:
        return rules.Keep(self.base.build(ctx), self.beta, self.alpha)


class RouteSpec(_Based):
    """Several experts, no label: the experts moving the small model toward the large model's
    prediction form one virtual expert (all on the best at temperature 0), weighed by the base."""

    kind: Literal["route"] = "route"
    temperature: float = Field(0.0, ge=0, le=limits.MAX_WEIGHT)
    base: Base = StaticSpec()
    syntax: ClassVar[str] = "route[:TEMPERATURE][:static:a|dynamic...]"
    _settings: ClassVar[tuple[str, ...]] = ("temperature",)

    def recipe_problem(self, expert_names, has_delta):
        if isinstance(self.base, StaticSpec) and len(self.base.weights) != 1:
            return "solver kind 'route' weighs one virtual expert: give its base one static weight"
        return super().recipe_problem(expert_names, has_delta)

    def build(self, ctx: MethodContext) -> Solver:
        return rules.Route(self.base.build(ctx), self.temperature)


for _spec in (PlausibleSpec, NudgeSpec, KeepSpec, RouteSpec):
    register(_spec)
