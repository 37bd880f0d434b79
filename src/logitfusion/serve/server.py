"""An OpenAI-compatible HTTP server for fused models (`logitfusion serve`).

    app = create_app({"fusion": Fuser.from_recipe("fusion.yaml")}, api_key="...")

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`),
GET /health (no auth) and GET /metrics (Prometheus text). Requests carry fusion options in an
extra body field: {"fusion": {"solver": "dynamic", "experts": [...], "return_weights": true}}.

Decoding goes through the engine's one loop, `decoding.Batch`, driven by ONE scheduler thread
(torch work never runs on the event loop). The scheduler batches dynamically: requests that
arrive while others decode are prefilled and join the running batch at the next step boundary,
finished (or cancelled) sequences leave it. There is one Batch per (model, solver) in use, and
the scheduler steps them in turn. Everything that touches a tokenizer or a model runs on that
thread; the event loop only parses requests and relays events.

Every client-visible error is in the OpenAI format {"error": {"message", "type", "param",
"code"}}; unexpected failures are logged with their traceback and answered with a generic 500.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import limits
from ..engine.decoding import Batch, Seq, validate_prompts
from ..engine.sampling import DecodingError, SamplingParams
from ..engine.fuser import Fuser
from ..engine.solvers import Choice, Solver, SolverError

log = logging.getLogger("logitfusion.serve.server")

DEFAULT_MAX_BATCH = limits.SERVER_MAX_BATCH  # the bounds live in limits.py; these names are the server's
DEFAULT_MAX_QUEUE = limits.SERVER_MAX_QUEUE
DEFAULT_MAX_TOKENS_LIMIT = limits.SERVER_MAX_TOKENS
DEFAULT_MAX_BODY_BYTES = limits.SERVER_MAX_BODY_BYTES
MAX_STOP = limits.SERVER_MAX_STOP
MAX_LOGPROBS = limits.MAX_LOGPROBS
CHAT_FALLBACK_STOP = "\nuser:"
LOGPROB_FLOOR = -9999.0  # log(0) as a number: -inf is not JSON (vLLM does the same)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:/\-]+$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
JSON_ROUTES = ("/v1/completions", "/v1/chat/completions")


# ---------------------------------------------------------------- errors in the OpenAI format

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _JSON(self.body(), status_code=self.status, headers=self.headers)


class _JSON(JSONResponse):
    """ASCII JSON: a message that quotes a request's lone surrogate still encodes, and NaN (never
    valid JSON) cannot slip into a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


INTERNAL = APIError(500, "internal server error; the server log has the details", "server_error",
                    code="internal_error")


# ---------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata...)


class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    solver: str | None = Field(None, description="large | expert[:NAME] | static[:a,...] | dynamic[:fast|joint]")
    experts: list[str] | None = Field(None, description="fuse only these experts (dynamic and static solvers)")
    return_weights: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI; as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # not OpenAI; as in vLLM (benchmarks)
    fusion: FusionOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]  # a free-form role would be written into the prompt
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------- metrics (Prometheus text format)

class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms, updated from the event loop and the scheduler thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> n
        self.latency: dict[str, Histogram] = defaultdict(Histogram)  # route -> request seconds
        self.ttft = Histogram()  # seconds from submission to the first generated token
        self.tokens: Counter = Counter()  # model -> generated tokens
        self.prompt_tokens: Counter = Counter()  # model -> prompt tokens (first model's tokenisation)
        self.finished: Counter = Counter()  # (model, finish_reason) -> sequences
        self.steps = 0  # decoding steps (one per Batch.step)
        self.rows = 0  # sum over steps of the rows stepped (rows / steps = mean batch size)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            self.latency[route].observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        with self.lock:
            out = ["# HELP logitfusion_requests_total HTTP requests by route and status code.",
                   "# TYPE logitfusion_requests_total counter"]
            out += [f'logitfusion_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP logitfusion_request_duration_seconds Request latency, to the last byte of the "
                    "response (streams included).", "# TYPE logitfusion_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("logitfusion_request_duration_seconds", f'route="{_label(route)}"')
            out += ["# HELP logitfusion_time_to_first_token_seconds From admission to the queue to the first "
                    "generated token.", "# TYPE logitfusion_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("logitfusion_time_to_first_token_seconds")
            out += ["# HELP logitfusion_generated_tokens_total Tokens generated, by model.",
                    "# TYPE logitfusion_generated_tokens_total counter"]
            out += [f'logitfusion_generated_tokens_total{{model="{_label(m)}"}} {n}'
                    for m, n in sorted(self.tokens.items())]
            out += ["# HELP logitfusion_prompt_tokens_total Prompt tokens prefilled, by model.",
                    "# TYPE logitfusion_prompt_tokens_total counter"]
            out += [f'logitfusion_prompt_tokens_total{{model="{_label(m)}"}} {n}'
                    for m, n in sorted(self.prompt_tokens.items())]
            out += ["# HELP logitfusion_sequences_finished_total Sequences finished, by model and reason.",
                    "# TYPE logitfusion_sequences_finished_total counter"]
            out += [f'logitfusion_sequences_finished_total{{model="{_label(m)}",reason="{r}"}} {n}'
                    for (m, r), n in sorted(self.finished.items())]
            out += ["# HELP logitfusion_decode_steps_total Batch decoding steps.",
                    "# TYPE logitfusion_decode_steps_total counter", f"logitfusion_decode_steps_total {self.steps}",
                    "# HELP logitfusion_decode_rows_total Rows over all decoding steps (divide by steps for "
                    "the mean batch size).", "# TYPE logitfusion_decode_rows_total counter",
                    f"logitfusion_decode_rows_total {self.rows}"]
        for name, (help_text, value) in gauges.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- solvers per request

class ExpertSubset(Solver):
    """Runs a solver on a subset of the experts: only those models run, weights are per subset expert.

    The engine reads `solver.experts` (indices into the model set's experts) to decide which
    expert models to run and stack, so a subset needs no change in the decoding loop.
    """

    def __init__(self, inner: Solver, indices: tuple[int, ...]):
        self.inner, self.experts = inner, tuple(indices)
        self.uses_large, self.uses_small, self.name = inner.uses_large, inner.uses_small, inner.name

    def check(self, n_experts: int) -> None:
        if any(not 0 <= i < n_experts for i in self.experts):
            raise SolverError(f"expert indices {list(self.experts)} out of range for {n_experts} experts")
        self.inner.check(len(self.experts))

    def __call__(self, z_large, z_small, z_experts) -> Choice:
        return self.inner(z_large, z_small, z_experts)


def build_solver(fuser: Fuser, options: FusionOptions | None) -> tuple[tuple, Solver, str, list[str]]:
    """(cache key, solver, spec, experts used) for a request's fusion options."""
    spec = (options.solver or "").strip() if options else ""
    names = list(fuser.expert_names)
    subset = options.experts if options else None
    try:
        if subset is not None:
            kind = spec.partition(":")[0] or fuser.recipe.solver.kind
            if kind not in ("dynamic", "static"):
                raise SolverError(f"fusion.experts applies to the dynamic and static solvers, not {kind!r}")
            unknown = [e for e in subset if e not in names]
            if unknown or not subset or len(set(subset)) != len(subset):
                raise SolverError(f"fusion.experts must be distinct names among {names}; got {subset}")
            idx = tuple(sorted(names.index(e) for e in subset))
            used = [names[i] for i in idx]
            spec = spec or kind
            inner = _parse(fuser, spec, used)
            return ("subset", spec, idx), ExpertSubset(inner, idx), spec, used
        if not spec:
            solver = fuser.solver
            used = [names[i] for i in solver.experts] if solver.experts is not None else names
            if not (solver.uses_small or solver.experts):
                used = []
            return ("default",), solver, fuser.recipe.solver.kind, used
        solver = _parse(fuser, spec, names)
        used = names if solver.experts is None else [names[i] for i in solver.experts]
        return ("spec", spec), solver, spec, used
    except SolverError as e:
        raise APIError(400, str(e), param="fusion", code="invalid_solver") from None


def _parse(fuser: Fuser, spec: str, names: list[str]) -> Solver:
    return fuser.recipe.method(spec, names)


# ---------------------------------------------------------------- chat prompts

def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """The prompt for a chat, and stop strings it implies.

    With a chat template: tokenizer.apply_chat_template(..., add_generation_prompt=True), no extra
    stop (the template's end-of-turn token is the tokenizer's EOS). Without one: the plain format
    "role: content" one message per line, then "assistant:"; "\\nuser:" is then a stop string, so
    the model does not write the user's next turn.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors, e.g. raise_exception("roles must alternate")
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages",
                           code="chat_template_error") from None
        return text, []
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"]), [CHAT_FALLBACK_STOP]


def _check_text(param: str, text: str) -> None:
    """Text every tokenizer can read; checked here, so that a lone surrogate is this request's 400
    and never an exception on the scheduler thread."""
    problem = limits.text_problem(param, text)
    if problem:
        raise APIError(400, problem, param=param.partition("[")[0], code="invalid_text")


def _param_of(message: str) -> str | None:
    """The request field a SamplingParams message names (its first word)."""
    word = message.split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "seed": "seed", "stop": "stop", "a": "stop", "at": "stop"}.get(word)


def _message_text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}]: only text content parts are supported, got {part.type!r}",
                           param="messages")
        parts.append(part.text)
    return "".join(parts)


# ---------------------------------------------------------------- following one sequence

def holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Tracker:
    """What a client sees of one sequence, computed on the scheduler thread as tokens arrive.

    Text is handed out only where it is stable: the sequence's incrementally decoded text
    (`Seq.text`: the decode of all tokens so far minus trailing U+FFFD, an incomplete multi-byte
    character completed by a later token) minus a suffix that could begin a stop string. Each
    token costs the same whatever the length: nothing here rereads the text already sent. The
    final chunk is the rest of `Seq.result`, so the streamed pieces add up to the non-streamed
    text. Token entries (for logprobs) carry each token's offset in the text; a chunk carries the
    entries of tokens that start in the text sent so far.
    """

    def __init__(self, job: "Job", tokenizer):
        self.job, self.tok = job, tokenizer
        self.sent: list[str] = []  # text handed out, in pieces
        self.n_sent = 0  # its length
        self.n_entries = 0  # token entries handed out
        self.n_steps = 0  # steps whose weights were handed out

    @property
    def seq(self) -> Seq:
        return self.job.seq

    @property
    def offsets(self) -> list[int]:
        """Start of each token in the text."""
        return self.seq.text(self.tok).offsets

    def advance(self) -> dict | None:
        """After a step: a delta {"text", "entries", "weights"} to stream, or None."""
        text = self.seq.text(self.tok)
        if not self.job.stream or self.seq.done:
            return None
        stops = list(self.seq.params.stop)
        upto = text.length - holdback(text.tail(max(map(len, stops), default=1) - 1), stops)
        if upto <= self.n_sent:
            return None
        delta = text.tail(text.length - self.n_sent)[: upto - self.n_sent]
        self.sent.append(delta)
        self.n_sent = upto
        n = bisect.bisect_left(text.offsets, upto)  # tokens starting inside the sent text
        return {"text": delta, "entries": self._entries(n), "weights": self._weights(len(self.seq.steps))}

    def finish(self, text: str) -> dict:
        """The rest, once the sequence is done: {"text", "entries", "weights"}."""
        sent = "".join(self.sent)
        if text.startswith(sent):
            delta = text[len(sent):]
        else:  # a tokenizer whose decoding is not prefix-stable (e.g. clean_up_tokenization_spaces)
            log.warning("streamed text diverged from the final decode; sent %r, final %r", sent, text)
            delta = ""
        seq = self.seq
        n = len(seq.tokens)
        offsets = self.offsets
        if seq.finish_reason == "eos":
            n -= 1  # the EOS token is not part of the text
        elif seq.finish_reason == "stop" and seq.stop_at is not None and offsets:
            n = bisect.bisect_left(offsets, seq.stop_at)  # tokens of the stop string are cut off
        return {"text": delta, "entries": self._entries(max(n, self.n_entries)) if self.job.logprobs is not None
                else [], "weights": self._weights(len(seq.steps))}

    def _entries(self, upto: int) -> list[dict]:
        job, seq = self.job, self.seq
        if job.logprobs is None:
            self.n_entries = upto
            return []
        out, text = [], seq.text(self.tok)
        offsets = text.offsets
        for i in range(self.n_entries, min(upto, len(seq.tokens), len(seq.logprobs))):
            entry = {"token": self.tok.decode([seq.tokens[i]]), "logprob": max(seq.logprobs[i], LOGPROB_FLOOR),
                     "offset": offsets[i] if i < len(offsets) else text.length, "top": []}
            if job.logprobs and i < len(seq.steps):
                entry["top"] = [(self.tok.decode([t]), math.log(p) if p > 0 else LOGPROB_FLOOR)
                                for t, p in seq.steps[i].top.get("fused", [])[: job.logprobs]]
            out.append(entry)
        self.n_entries = max(self.n_entries, upto)
        return out

    def _weights(self, upto: int) -> list[list[float]]:
        steps = self.seq.steps[self.n_steps: upto]
        self.n_steps = max(self.n_steps, upto)
        if not self.job.return_weights:
            return []
        return [s.weights for s in steps if s.weights is not None]


# ---------------------------------------------------------------- the scheduler

class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it. Events go to `events` on the request's event loop."""

    model: str
    fuser: Fuser
    key: tuple
    solver: Solver
    prompt: str
    params: SamplingParams
    stream: bool
    logprobs: int | None  # None: no logprobs; k: the chosen token plus k alternatives
    return_weights: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: str = "pending"  # pending | active | finished
    seq: Seq | None = None
    tracker: Tracker | None = None
    prompt_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: bool = False

    @property
    def trace(self) -> bool:  # weights and top alternatives come from the engine's trace
        return self.return_weights or bool(self.logprobs)

    def emit(self, kind: str, data: dict | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data or {}))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class Scheduler:
    """One thread owns every Batch. Each round: apply cancellations, admit waiting requests into
    their (model, solver) Batch (prefill, joining at this step boundary), step every Batch once
    and hand each request its new tokens; finished sequences leave their Batch at its next step."""

    def __init__(self, max_batch: int, max_queue: int, metrics: Metrics):
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: set[Job] = set()
        self._cancels: list[Job] = []
        self._batches: dict[tuple, Batch] = {}
        self._members: dict[tuple, list[Job]] = defaultdict(list)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- event loop side

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="logitfusion-scheduler", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        if self._thread is None:
            self.start()
        with self._cond:
            if not self.alive:
                raise Unavailable()
            if len(self._pending) + len(self._active) >= self.max_batch + self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop a waiting request, or finish a running one at the next step."""
        with self._cond:
            if job.state == "pending":
                try:
                    self._pending.remove(job)
                except ValueError:
                    pass
                job.state = "finished"
            elif job.state == "active":
                self._cancels.append(job)
                self._cond.notify()

    def gauges(self) -> dict[str, tuple[str, float]]:
        with self._cond:
            pending, active = len(self._pending), len(self._active)
            batches = sum(1 for b in self._batches.values() if len(b))
        return {"logitfusion_queue_depth": ("Requests waiting for a decoding slot.", pending),
                "logitfusion_active_sequences": ("Sequences being decoded.", active),
                "logitfusion_running_batches": ("Batches (one per model and solver in use) with rows.", batches),
                "logitfusion_max_batch": ("Configured decoding slots.", self.max_batch),
                "logitfusion_max_queue": ("Configured queue length beyond the slots.", self.max_queue),
                "logitfusion_scheduler_up": ("1 while the scheduler thread runs.", 1.0 if self.alive else 0.0)}

    # -- scheduler thread

    def _run(self) -> None:
        import torch
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._active or self._cancels):
                        self._cond.wait()
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                    free = max(0, self.max_batch - len(self._active))
                    admit = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
                    for job in admit:
                        job.state = "active"
                        self._active.add(job)
                try:
                    for job in cancels:
                        if job.state == "active":
                            if job.seq is not None:
                                job.seq.cancel()  # its row leaves its Batch at the next step
                            self._retire(job, "cancelled")
                    self._admit(admit)
                    self._step_all()
                except Exception:  # a bug: never let the thread die silently with requests waiting
                    log.exception("scheduler round failed; failing the requests it was serving")
                    for key in list(self._batches):
                        self._fail_batch(key)
                    for job in admit:  # admitted but never started: answer them, free their slots
                        if job.state == "active":
                            self._fail(job, INTERNAL)
        self._shutdown()

    def _retire(self, job: Job, reason: str) -> None:
        with self._cond:
            self._active.discard(job)
            job.state = "finished"
        with self.metrics.lock:
            self.metrics.finished[(job.model, reason)] += 1

    def _fail(self, job: Job, error: APIError) -> None:
        if job.seq is not None:
            job.seq.cancel()
        self._retire(job, "error")
        job.emit("error", {"error": error})

    def _admit(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            groups[(job.model, job.key, job.trace)].append(job)
        for (model, key, trace), group in groups.items():
            ok = [job for job in group if self._tokenise(job)]  # a bad prompt fails only its request
            if ok:
                self._join((model, key), ok, trace)

    def _tokenise(self, job: Job) -> bool:
        """Check one request's prompt against the models it runs; False (and answered) if it fails."""
        try:
            encoded = validate_prompts(job.fuser.models, [job.prompt], job.solver)
            job.prompt_tokens = len(next(iter(encoded.values()))[0])
            return True
        except (DecodingError, SolverError) as e:
            self._fail(job, APIError(400, str(e), param="prompt", code="invalid_prompt"))
        except Exception as e:  # the tokenizer choked on this request's text alone
            self._fail(job, self._request_error(job, e, "tokenised"))
        return False

    def _request_error(self, job: Job, e: Exception, stage: str) -> APIError:
        log.error("request for %s could not be %s", job.model, stage, exc_info=e)
        return APIError(400, f"this request could not be {stage} ({type(e).__name__}); check its prompt and "
                        "parameters (the server log has the details)", code="invalid_request")

    def _join(self, bkey: tuple, jobs: list[Job], trace: bool) -> None:
        """Prefill `jobs` and merge them into their Batch. A prefill failure leaves the running rows
        untouched: with one request it is that request's 400; with several they are retried one by
        one, so that only the request that causes it fails."""
        fuser = jobs[0].fuser
        try:
            # The recipe's speculation applies here as in `generate`: greedy output is unchanged,
            # sampled output keeps its distribution.
            batch = self._batches.get(bkey)
            if batch is None:
                batch = Batch(fuser.models, jobs[0].solver, speculate=fuser.recipe.generation.speculate)
            joining = batch.prefill([j.prompt for j in jobs], [j.params for j in jobs], trace=trace)
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._join(bkey, [job], trace)
                return
            known = isinstance(e, (DecodingError, SolverError))
            self._fail(jobs[0], APIError(400, str(e), code="invalid_request") if known
                       else self._request_error(jobs[0], e, "prefilled"))
            return
        self._batches[bkey] = batch
        try:
            seqs = batch.join(joining)
        except Exception:  # merging caches is ours alone: a bug, and the batch may be inconsistent
            log.exception("joining the batch of %s failed", bkey[0])
            for job in jobs:
                self._fail(job, INTERNAL)
            self._fail_batch(bkey)
            return
        for job, seq in zip(jobs, seqs):
            job.seq = seq
            job.tracker = Tracker(job, fuser.models.tokenizer)
            self._members[bkey].append(job)
            job.emit("started", {"prompt_tokens": job.prompt_tokens})
        with self.metrics.lock:
            self.metrics.prompt_tokens[bkey[0]] += sum(j.prompt_tokens for j in jobs)

    def _step_all(self) -> None:
        for bkey in list(self._batches):
            batch = self._batches[bkey]
            if not len(batch):
                del self._batches[bkey]
                self._members.pop(bkey, None)
                continue
            rows = len(batch)
            try:
                emitted = batch.step()
            except Exception:
                log.exception("decoding step failed for %s", bkey)
                self._fail_batch(bkey)
                continue
            now = time.perf_counter()
            with self.metrics.lock:
                self.metrics.steps += 1
                self.metrics.rows += rows
                self.metrics.tokens[bkey[0]] += len(emitted)
            still = []
            for job in self._members.get(bkey, []):
                if job.state != "active":
                    continue  # cancelled: its row was dropped by this step
                try:
                    if self._relay(job, now):
                        still.append(job)
                except Exception:  # one request's text could not be followed: it alone fails
                    log.exception("relaying tokens of a request for %s failed", bkey[0])
                    self._fail(job, INTERNAL)
            self._members[bkey] = still

    def _relay(self, job: Job, now: float) -> bool:
        """Hand one request its new tokens after a step; False once it is done."""
        if job.seq.tokens and not job.first_token:
            job.first_token = True
            with self.metrics.lock:
                self.metrics.ttft.observe(now - job.submitted)
        needs_text = job.stream or job.logprobs is not None
        delta = job.tracker.advance() if needs_text else None
        if job.seq.done:
            self._complete(job)
            return False
        if delta is not None:
            job.emit("delta", delta)
        return True

    def _complete(self, job: Job) -> None:
        seq = job.seq
        gen = seq.result(job.fuser.models.tokenizer)
        rest = job.tracker.finish(gen.text)
        self._retire(job, seq.finish_reason or "length")
        job.emit("done", {"text": gen.text, "rest": rest, "finish_reason": seq.finish_reason, "error": seq.error,
                          "completion_tokens": len(seq.tokens), "prompt_tokens": job.prompt_tokens})

    def _fail_batch(self, bkey: tuple) -> None:
        for job in self._members.pop(bkey, []):
            if job.state == "active":
                self._fail(job, INTERNAL)
        self._batches.pop(bkey, None)

    def _shutdown(self) -> None:
        with self._cond:
            jobs = list(self._pending) + list(self._active)
            self._pending.clear()
        for job in jobs:
            self._fail(job, APIError(503, "the server is shutting down", "server_error", code="shutting_down"))
        self._batches.clear()
        self._members.clear()


# ---------------------------------------------------------------- HTTP middleware: auth, body size, metrics

async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=True).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Bearer API key on every route but /health (401), request bodies bounded (413), and the
    request metrics (count by route and status, latency to the last byte)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body_bytes, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.key is not None and path != "/health" and not self._authorized(headers):
                return await _send_json(send_tracked, 401, APIError(
                    401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                    "authentication_error", code="invalid_api_key").body(), {"WWW-Authenticate": "Bearer"})
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                too_big = APIError(413, f"request body exceeds {self.max_body} bytes", code="request_too_large")
                length = headers.get(b"content-length")
                if length is not None:
                    try:
                        if int(length) > self.max_body:
                            return await _send_json(send_tracked, 413, too_big.body(), {"Connection": "close"})
                    except ValueError:
                        return await _send_json(send_tracked, 400, APIError(400, "bad Content-Length header").body())
                body, more = bytearray(), True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        status[0] = 499
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await _send_json(send_tracked, 413, too_big.body(), {"Connection": "close"})
                if path in JSON_ROUTES and body and not _is_json(headers.get(b"content-type")):
                    ctype = headers[b"content-type"].decode("latin-1")
                    return await _send_json(send_tracked, 415, APIError(
                        415, f"the request body must be JSON sent with the header 'Content-Type: application/json'; "
                        f"got Content-Type {ctype!r}", code="unsupported_media_type").body())
                receive = _replay(bytes(body), receive)
            await self.app(scope, receive, send_tracked)
        finally:
            self.metrics.request(route, status[0], time.perf_counter() - t0)

    def _authorized(self, headers: dict) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def _is_json(content_type: bytes | None) -> bool:
    """No Content-Type is read as JSON (as FastAPI does); a declared one must say JSON."""
    if content_type is None:
        return True
    kind = content_type.split(b";")[0].strip().lower()
    return kind == b"application/json" or kind.endswith(b"+json")


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: http.disconnect

    return replay


# ---------------------------------------------------------------- the app

def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _top_dict(top: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, logprob in top:  # best first; tokens that decode alike (e.g. partial bytes) keep the best
        out.setdefault(token, logprob)
    return out


def _completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_top_dict(e["top"]) for e in entries] if any(e["top"] for e in entries) else None,
            "text_offset": [e["offset"] for e in entries]}


def _chat_logprobs(entries: list[dict]) -> dict:
    def one(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


def create_app(fusers: dict[str, Fuser], api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_batch: int = DEFAULT_MAX_BATCH, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app serving each Fuser under its name (the request's `model`)."""
    if not fusers:
        raise ValueError("create_app needs at least one model: {name: Fuser}")
    bad = [n for n in fusers if not NAME_PATTERN.match(n)]
    if bad:
        raise ValueError(f"model names {bad} must match {NAME_PATTERN.pattern}")
    if max_batch < 1 or max_queue < 0 or max_tokens_limit < 1 or max_body_bytes < 1:
        raise ValueError("max_batch, max_tokens_limit and max_body_bytes must be >= 1, max_queue >= 0")
    if max_tokens_limit > limits.MAX_NEW_TOKENS:
        raise ValueError(f"max_tokens_limit must be at most {limits.MAX_NEW_TOKENS}, got {max_tokens_limit}")
    metrics = Metrics()
    scheduler = Scheduler(max_batch, max_queue, metrics)
    created = int(time.time())
    solvers: dict[tuple, tuple] = {}

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="logitfusion", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.fusers = scheduler, metrics, fusers
    app.state.max_tokens_limit = max_tokens_limit
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    # -- errors

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            param = loc[0] if loc else None
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        return APIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return INTERNAL.response()

    # -- routes

    def model_card(name: str) -> dict:
        f = fusers[name]
        return {"id": name, "object": "model", "created": created, "owned_by": "logitfusion",
                "experts": list(f.expert_names), "solver": f.recipe.solver.kind}

    @app.get("/health")
    async def health():
        ok = scheduler.alive or scheduler._thread is None
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": list(fusers)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(scheduler.gauges()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in fusers]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in fusers:
            raise _unknown_model(name)
        return model_card(name)

    def _unknown_model(name: str) -> APIError:
        return APIError(404, f"model {name!r} does not exist; available: {list(fusers)}", param="model",
                        code="model_not_found")

    def prepare(body: _Sampling, max_tokens: int | None, stop_extra: list[str], logprobs: int | None):
        """Checks shared by both routes -> (fuser, key, solver, spec, experts, params)."""
        if body.model not in fusers:
            raise _unknown_model(body.model)
        fuser = fusers[body.model]
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: this server returns one choice per request "
                           "(send several requests; they are batched together)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (leave it 0)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {max_tokens_limit} (the server's limit), "
                           f"got {max_tokens}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop is not None:
            if len(stop) > MAX_STOP:
                raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
            if any(not s for s in stop):
                raise APIError(400, "stop strings must be non-empty", param="stop")
            for s in stop:
                _check_text("stop", s)
        key = (body.fusion.solver, tuple(body.fusion.experts) if body.fusion.experts is not None else None) \
            if body.fusion else (None, None)
        if (body.model, key) not in solvers:
            if len(solvers) >= 256:  # arbitrary specs ("static:0.123") must not grow it without bound
                solvers.clear()
            solvers[(body.model, key)] = build_solver(fuser, body.fusion)
        skey, solver, spec, used = solvers[(body.model, key)]
        default_max = min(fuser.recipe.generation.max_new_tokens, max_tokens_limit)
        try:
            params = fuser.sampling(max_new_tokens=max_tokens if max_tokens is not None else default_max,
                                    temperature=body.temperature,
                                    top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                    stop=(list(stop) if stop is not None else None))
            params.stop = list(params.stop) + [s for s in stop_extra if s not in params.stop]
            params.ignore_eos, params.logprobs = body.ignore_eos, logprobs is not None
            if isinstance(params.seed, (list, tuple)):
                params.seed = None
            params.check()  # a seed is checked even where greedy decoding ignores it
            if params.temperature == 0:
                params.seed = None
        except DecodingError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        return fuser, skey, solver, spec, used, params

    async def run(request: Request, body: _Sampling, kind: Literal["text", "chat"], prompt: str,
                  max_tokens: int | None, stop_extra: list[str], logprobs: int | None):
        fuser, skey, solver, spec, used, params = prepare(body, max_tokens, stop_extra, logprobs)
        want_weights = bool(body.fusion and body.fusion.return_weights)
        job = Job(body.model, fuser, skey, solver, prompt, params, bool(body.stream), logprobs, want_weights,
                  asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is at capacity ({max_batch} decoding, {max_queue} queued); "
                           "retry later", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except Unavailable:
            raise APIError(503, "the decoding scheduler is not running", "server_error", code="unavailable")
        rid = ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex
        now = int(time.time())
        fusion_info = {"solver": spec, "experts": used}
        try:
            event, data = await _next(job, request)  # admitted, or rejected by prompt validation
        except BaseException:
            scheduler.cancel(job)
            raise
        if event == "error":
            raise data["error"]
        if event == "disconnected":
            return JSONResponse({}, status_code=499)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, request, kind, rid, now, body.model, fusion_info, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        entries, weights = [], []
        while True:
            event, data = await _next(job, request)
            if event == "disconnected":
                return JSONResponse({}, status_code=499)
            if event == "error":
                raise data["error"]
            if event == "delta":  # only with logprobs: entries arrive in pieces
                entries += data["entries"]
                weights += data["weights"]
            if event == "done":
                break
        if data["finish_reason"] == "error":
            raise APIError(500, data["error"] or "decoding failed", "server_error", code="decoding_error")
        entries += data["rest"]["entries"]
        weights += data["rest"]["weights"]
        finish = FINISH.get(data["finish_reason"], "length")
        usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                 "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
        fusion = fusion_info | ({"weights": weights} if want_weights else {})
        if kind == "text":
            choice = {"index": 0, "text": data["text"], "finish_reason": finish,
                      "logprobs": _completion_logprobs(entries) if logprobs is not None else None}
            return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                    "choices": [choice], "usage": usage, "fusion": fusion}
        choice = {"index": 0, "message": {"role": "assistant", "content": data["text"]}, "finish_reason": finish,
                  "logprobs": _chat_logprobs(entries) if logprobs is not None else None}
        return {"id": rid, "object": "chat.completion", "created": now, "model": body.model, "choices": [choice],
                "usage": usage, "fusion": fusion}

    async def _next(job: Job, request: Request) -> tuple[str, dict]:
        """The job's next event; polls for a client that went away meanwhile (then cancels the job)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return "disconnected", {}

    async def _stream(job: Job, request: Request, kind: str, rid: str, now: int, model: str, fusion_info: dict,
                      include_usage: bool):
        obj = "text_completion" if kind == "text" else "chat.completion.chunk"

        def chunk(text: str | None, entries: list[dict], weights: list, finish: str | None, role: bool = False):
            if kind == "text":
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": _completion_logprobs(entries) if job.logprobs is not None else None}
            else:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish,
                          "logprobs": _chat_logprobs(entries) if job.logprobs is not None else None}
            out = {"id": rid, "object": obj, "created": now, "model": model, "choices": [choice]}
            if job.return_weights:
                out["fusion"] = fusion_info | {"weights": weights}
            return _sse(out)

        finished = False
        try:
            if kind == "chat":
                yield chunk("", [], [], None, role=True)
            while True:
                event, data = await job.events.get()  # a disconnect cancels this await (Starlette)
                if event == "delta":
                    yield chunk(data["text"], data["entries"], data["weights"], None)
                elif event == "error":
                    finished = True
                    yield _sse(data["error"].body())
                    break
                elif event == "done":
                    finished = True
                    if data["finish_reason"] == "error":
                        yield _sse(APIError(500, data["error"] or "decoding failed", "server_error",
                                            code="decoding_error").body())
                        break
                    rest = data["rest"]
                    yield chunk(rest["text"], rest["entries"], rest["weights"],
                                FINISH.get(data["finish_reason"], "length"))
                    if include_usage:
                        usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                                 "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
                        yield _sse({"id": rid, "object": obj, "created": now, "model": model, "choices": [],
                                    "usage": usage})
                    break
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("stream %s failed", rid)
            yield _sse(INTERNAL.body())
        finally:
            if not finished:  # client gone (the task was cancelled) or a failure: free the slot
                scheduler.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, f"prompt must be one string (or a list of one), got a list of {len(body.prompt)}; "
                               "send one request per prompt (they are batched together)", param="prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (only 1)", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        _check_text("prompt", prompt)
        if not prompt:
            raise APIError(400, "prompt is empty; give some text to continue", param="prompt")
        return await run(request, body, "text", prompt, body.max_tokens, [], body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "give max_tokens or max_completion_tokens, not two different values",
                           param="max_completion_tokens")
        if body.model not in fusers:
            raise _unknown_model(body.model)
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        for i, m in enumerate(messages):
            _check_text(f"messages[{i}].content", m["content"])
        prompt, stops = chat_prompt(fusers[body.model].models.tokenizer, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(request, body, "chat", prompt, max_tokens, stops, logprobs)

    return app


def _version() -> str:
    from .. import __version__
    return __version__
