"""The serving logic over the engine: a request's checks, its prompt (chat prompting included), its
solver and sampling parameters, its submission to the scheduler, and its answer (one JSON body or
a stream of server-sent events)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Literal, NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine import limits, registry
from ..engine.errors import DecodingError, SolverError
from ..engine.fuser import Fuser
from ..engine.members import ModelSet
from ..engine.sampling import SamplingParams
from ..engine.solvers import Solver
from .events import Delta, Disconnected, Done, Event, Failed, request_param
from .protocol import (FINISH, INTERNAL, APIError, ChatMessage, ChatRequest, CompletionRequest, FusionOptions, Reply,
                       SamplingRequest, decoding_error, sse, usage)
from .scheduler import Job, QueueFull, Scheduler, Unavailable

log = logging.getLogger(__name__)

MAX_STOP = limits.SERVER_MAX_STOP
CHAT_FALLBACK_STOP = "\nuser:"
SOLVER_CACHE = 256  # arbitrary specs ("static:0.123") must not grow the cache without bound


# ---------------------------------------------------------------- solvers per request

class RequestSolver(NamedTuple):
    """How a request's fusion options decode: its solver over its models (all of the fuser's, or
    the experts of fusion.experts only), the key of batches it may share, what the answer reports."""

    key: tuple
    solver: Solver
    spec: str
    experts: list[str]  # the experts the solver reads
    models: ModelSet


def build_solver(fuser: Fuser, options: FusionOptions | None) -> RequestSolver:
    """The solver and models for a request's fusion options."""
    spec = (options.solver or "").strip() if options else ""
    names = list(fuser.expert_names)
    subset = options.experts if options else None
    try:
        if subset is not None:
            kind = registry.split_method(spec)[0] or fuser.recipe.solver.kind
            if kind not in registry.expert_subset_kinds():
                raise SolverError(f"fusion.experts applies to the solvers that weigh experts "
                                  f"({', '.join(registry.expert_subset_kinds())}), not {kind!r}", field="fusion")
            unknown = [e for e in subset if e not in names]
            if unknown or not subset or len(set(subset)) != len(subset):
                raise SolverError(f"fusion.experts must be distinct names among {names}; got {subset}")
            models = fuser.models.subset(subset)
            spec = spec or kind
            return RequestSolver(("subset", spec, tuple(models.expert_names)), fuser.recipe.method(
                spec, models.expert_names), spec, models.expert_names, models)
        solver = fuser.solver if not spec else fuser.recipe.method(spec, names)
        # Which experts it reads, without asking for a model it lacks (that is the prompt check's 400).
        used = [m.name for m in fuser.models.select(solver.reads, solver.experts).experts]
        return RequestSolver(("spec", spec) if spec else ("default",), solver, spec or fuser.recipe.solver.kind,
                             used, fuser.models)
    except SolverError as e:
        raise APIError(400, str(e), param="fusion", code="invalid_solver") from None


# ---------------------------------------------------------------- prompts and request checks

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


def _completion_prompt(body: CompletionRequest) -> str:
    """The one prompt of a completion request, once the options this server lacks are refused."""
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
    return prompt


def _check_chat_options(body: ChatRequest) -> None:
    if body.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format type 'text' is supported", param="response_format")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "give max_tokens or max_completion_tokens, not two different values",
                       param="max_completion_tokens")


def _stops(body: SamplingRequest) -> list[str] | None:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None:
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        for s in stop:
            _check_text("stop", s)
    return stop


# ---------------------------------------------------------------- serving

class OpenAIServing:
    """The models served, and each request's way from its body to its answer through the scheduler."""

    def __init__(self, fusers: dict[str, Fuser], scheduler: Scheduler, max_tokens_limit: int):
        self.fusers, self.scheduler, self.max_tokens_limit = fusers, scheduler, max_tokens_limit
        self.created = int(time.time())
        self._solvers: dict[tuple, RequestSolver] = {}  # (model, fusion options) -> build_solver's answer

    # -- models

    def fuser(self, name: str) -> Fuser:
        if name not in self.fusers:
            raise APIError(404, f"model {name!r} does not exist; available: {list(self.fusers)}", param="model",
                           code="model_not_found")
        return self.fusers[name]

    def model_card(self, name: str) -> dict:
        f = self.fuser(name)
        return {"id": name, "object": "model", "created": self.created, "owned_by": "logitfusion",
                "experts": list(f.expert_names), "solver": f.recipe.solver.kind}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card(n) for n in self.fusers]}

    # -- the two generation routes

    async def create_completion(self, request: Request, body: CompletionRequest):
        prompt = _completion_prompt(body)
        return await self.run(request, body, "text", prompt, body.max_tokens, [], body.logprobs)

    async def create_chat_completion(self, request: Request, body: ChatRequest):
        _check_chat_options(body)
        fuser = self.fuser(body.model)
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        for i, m in enumerate(messages):
            _check_text(f"messages[{i}].content", m["content"])
        prompt, stops = chat_prompt(fuser.models.tokenizer, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self.run(request, body, "chat", prompt, max_tokens, stops, logprobs)

    # -- checks shared by both routes

    def prepare(self, body: SamplingRequest, max_tokens: int | None, stop_extra: list[str], logprobs: int | None):
        """Checks shared by both routes -> (fuser, its RequestSolver, params)."""
        fuser = self.fuser(body.model)
        self._check_options(body, max_tokens)
        stop = _stops(body)
        chosen = self._solver(body, fuser)
        params = self._sampling(fuser, body, max_tokens, stop, stop_extra, logprobs)
        return fuser, chosen, params

    def _check_options(self, body: SamplingRequest, max_tokens: int | None) -> None:
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: this server returns one choice per request "
                           "(send several requests; they are batched together)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (leave it 0)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if max_tokens is not None and not 1 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens_limit} (the server's limit), "
                           f"got {max_tokens}", param="max_tokens")

    def _solver(self, body: SamplingRequest, fuser: Fuser) -> RequestSolver:
        key = (body.fusion.solver, tuple(body.fusion.experts) if body.fusion.experts is not None else None) \
            if body.fusion else (None, None)
        if (body.model, key) not in self._solvers:
            if len(self._solvers) >= SOLVER_CACHE:
                self._solvers.clear()
            self._solvers[(body.model, key)] = build_solver(fuser, body.fusion)
        return self._solvers[(body.model, key)]

    def _sampling(self, fuser: Fuser, body: SamplingRequest, max_tokens: int | None, stop: list[str] | None,
                  stop_extra: list[str], logprobs: int | None) -> SamplingParams:
        default_max = min(fuser.recipe.generation.max_new_tokens, self.max_tokens_limit)
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
            raise APIError(400, str(e), param=request_param(e)) from None
        return params

    # -- submission and the answer

    async def run(self, request: Request, body: SamplingRequest, kind: Literal["text", "chat"], prompt: str,
                  max_tokens: int | None, stop_extra: list[str], logprobs: int | None):
        fuser, chosen, params = self.prepare(body, max_tokens, stop_extra, logprobs)
        want_weights = bool(body.fusion and body.fusion.return_weights)
        # Everything about how this request decodes is settled here: the scheduler only runs it.
        job = Job(body.model, fuser, chosen.key, chosen.solver, prompt, params, bool(body.stream), logprobs,
                  want_weights, asyncio.get_running_loop(), models=chosen.models, engine=fuser.engine)
        self._submit(job)
        reply = Reply(kind, ("cmpl-" if kind == "text" else "chatcmpl-") + uuid.uuid4().hex, int(time.time()),
                      body.model, {"solver": chosen.spec, "experts": chosen.experts}, logprobs is not None, want_weights)
        try:
            event = await self._next(job, request)  # Started, or Failed (e.g. its prompt's 400)
        except BaseException:
            self.scheduler.cancel(job)
            raise
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Disconnected):
            return JSONResponse({}, status_code=499)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(job, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(job, request, reply)

    def _submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is at capacity ({self.scheduler.max_batch} decoding, "
                           f"{self.scheduler.max_queue} queued); retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        except Unavailable:
            raise APIError(503, "the decoding scheduler is not running", "server_error", code="unavailable")

    async def _next(self, job: Job, request: Request) -> Event | Disconnected:
        """The job's next event; polls for a client that went away meanwhile (then cancels the job)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    return Disconnected()

    async def _collect(self, job: Job, request: Request, reply: Reply):
        """The whole answer as one body, once the sequence is done."""
        entries, weights = [], []
        while True:
            event = await self._next(job, request)
            if isinstance(event, Disconnected):
                return JSONResponse({}, status_code=499)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):  # only with logprobs: entries arrive in pieces
                entries += event.entries
                weights += event.weights
            if isinstance(event, Done):
                break
        if event.finish_reason == "error":
            raise decoding_error(event.error)
        entries += event.rest.entries
        weights += event.rest.weights
        return reply.body(event.text, entries, weights, FINISH.get(event.finish_reason, "length"), usage(event.counts))

    async def _stream(self, job: Job, reply: Reply, include_usage: bool):
        finished = False
        try:
            if reply.kind == "chat":
                yield reply.chunk("", [], [], None, role=True)
            while True:
                event = await job.events.get()  # a disconnect cancels this await (Starlette)
                if isinstance(event, Delta):
                    yield reply.chunk(event.text, event.entries, event.weights, None)
                elif isinstance(event, Failed):
                    finished = True
                    yield sse(event.error.body())
                    break
                elif isinstance(event, Done):
                    finished = True
                    if event.finish_reason == "error":
                        yield sse(decoding_error(event.error).body())
                        break
                    rest = event.rest
                    yield reply.chunk(rest.text, rest.entries, rest.weights, FINISH.get(event.finish_reason, "length"))
                    if include_usage:
                        yield reply.usage_chunk(usage(event.counts))
                    break
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("stream %s failed", reply.id)
            yield sse(INTERNAL.body())
        finally:
            if not finished:  # client gone (the task was cancelled) or a failure: free the slot
                self.scheduler.cancel(job)
