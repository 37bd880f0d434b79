"""What the scheduler thread tells a request's event loop, as typed events, and the request field
that an engine error is about.

A request's events, in order: `Started` once its prompt is prefilled (or `Failed` instead), then
`Delta`s while it decodes (streams, and log-probs in pieces), then `Done`, or `Failed` at any point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .protocol import APIError


@dataclass(frozen=True)
class Started:
    """The request joined a decoding batch."""

    prompt_tokens: int  # the first model's (the large model's) prompt length


@dataclass(frozen=True)
class Delta:
    """New stable text, the entries (log-probs) of the tokens that start in it, and the weights
    of the steps since the last delta."""

    text: str = ""
    entries: list[dict] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Done:
    """The sequence finished: its whole text, the rest not yet streamed, and its counts."""

    text: str
    rest: Delta
    finish_reason: str | None  # eos | stop | length | cancelled | error (then `error` says why)
    error: str | None
    completion_tokens: int
    prompt_tokens: int

    @property
    def counts(self) -> dict:
        """The token counts that `protocol.usage` reads."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True)
class Failed:
    """The request failed (its own 4xx, or a 5xx); nothing follows."""

    error: APIError


@dataclass(frozen=True)
class Disconnected:
    """Not sent by the scheduler: the client went away while its request waited for an event."""


Event = Started | Delta | Done | Failed


# ---------------------------------------------------------------- errors: engine field -> request field

# The engine's errors name the setting they are about (`DecodingError.field`, `SolverError.field`:
# a SamplingParams field); a request spells some of them differently.
REQUEST_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos", "logprobs": "logprobs"}


def request_param(error: Exception) -> str | None:
    """The request field an engine error is about, or None when it names none of them."""
    return REQUEST_PARAMS.get(getattr(error, "field", None))
