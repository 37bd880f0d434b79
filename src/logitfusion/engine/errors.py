"""The engine's user errors, declared once. Each may name the setting it is about (`field`: a
SamplingParams, EngineConfig or solver-spec field), so that a front end can point at the request
field without reading the message."""

from __future__ import annotations


class FieldError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DecodingError(FieldError):
    """Bad decoding input (empty prompt, prompt too long, bad sampling or engine settings...)."""


class SolverError(FieldError):
    """A solver that cannot be built or cannot run on the models given."""


def first_problem(checks) -> tuple[str, str] | None:
    """The first (field, problem) of `checks`, an iterable of (field, problem or None)."""
    return next(((f, p) for f, p in checks if p), None)
