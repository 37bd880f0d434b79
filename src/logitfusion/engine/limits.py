"""Every bound on a size or number a user controls, declared once.

The CLI, the library (`Fuser`, `SamplingParams`, the solvers), the recipe and the server all
import these, so a value refused in one place is refused everywhere with the same words. The
bounds keep a typo (a grid step of 1e-12, `--speculate 100000`, a seed of 2**70) from building
something that hangs or overflows; none of them limits a sensible run.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

MAX_GRID_POINTS = 10_000  # weight grid values: 0:2:0.1 has 21; the objective runs on all of them per step
MAX_WEIGHT = 1_000.0  # largest fusion weight (static or grid); beyond it logits overflow float32
MAX_SPECULATE = 16  # draft length of speculative decoding; the draft must fit the token budget
MAX_DRAFT_COST = 100.0  # cost of one more drafted position in plain steps; beyond it nothing drafts
MAX_NEW_TOKENS = 65_536  # tokens per sequence; a KV cache is reserved for this many positions
MAX_BATCH_SIZE = 4_096  # prompts decoded together by `generate`
MAX_TOP_K = 1 << 24  # above any vocabulary
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as the OpenAI API; seed + i still fits torch's 64 bits
MAX_STOP = 16  # stop strings per request (the server allows the OpenAI API's 4)
MAX_STOP_CHARS = 1_000  # characters of one stop string
MIN_PORT, MAX_PORT = 0, 65_535

# The server's defaults (`logitfusion serve` options, `create_app` arguments) and its API limits.
SERVER_MAX_BATCH = 32  # sequences decoded at once (all models and solvers together)
SERVER_MAX_QUEUE = 128  # requests waiting for a slot beyond those
SERVER_MAX_TOKENS = 1024  # largest max_tokens a request may ask for (at most MAX_NEW_TOKENS)
SERVER_MAX_BODY_BYTES = 1 << 20  # 1 MiB
SERVER_MAX_STOP = 4  # stop strings per request, as in the OpenAI API
MAX_LOGPROBS = 5  # alternatives per token (the engine's trace keeps the top 5)
MAX_JSON_DEPTH = 64  # nesting of a request body: messages, content parts and tool schemas need a few


def is_int(value) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def int_problem(name: str, value, lo: int, hi: int | None = None, hint: str = "") -> str | None:
    """Why `value` is not an int in [lo, hi], or None when it is."""
    if not is_int(value):
        return f"{name} must be a whole number, got {value!r}{hint}"
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        return f"{name} must be {bounds}, got {value}{hint}"
    return None


def weight_problem(name: str, values) -> str | None:
    """Why fusion weights are refused: not numbers, not finite, negative or above MAX_WEIGHT."""
    bad = [w for w in values if not (is_real(w) and math.isfinite(w) and 0.0 <= w <= MAX_WEIGHT)]
    if bad:
        return (f"{name} {bad[:5]} are outside [0, {MAX_WEIGHT:g}]: weights must be finite numbers from 0 to "
                f"{MAX_WEIGHT:g} (a = 1 is proxy-tuning; larger weights overflow the fused logits)")
    return None


def text_problem(name: str, text) -> str | None:
    """Why a string cannot be tokenised: not a string, or not valid Unicode (a lone surrogate
    such as "\\ud800", which JSON allows and every tokenizer rejects)."""
    if not isinstance(text, str):
        return f"{name} must be a string, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{name} is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}; "
                "send UTF-8 text")
    return None
