"""The OpenAI API's shapes: request bodies, error bodies, and the response pieces (logprobs, usage,
finish reasons, server-sent events) the completion and chat routes share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine import limits, registry

MAX_LOGPROBS = limits.MAX_LOGPROBS
LOGPROB_FLOOR = -9999.0  # log(0) as a number: -inf is not JSON (vLLM does the same)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


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
        return StrictJSON(self.body(), status_code=self.status, headers=self.headers)


class StrictJSON(JSONResponse):
    """ASCII JSON: a message that quotes a request's lone surrogate still encodes, and NaN (never
    valid JSON) cannot slip into a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


INTERNAL = APIError(500, "internal server error; the server log has the details", "server_error",
                    code="internal_error")


def decoding_error(message: str | None) -> APIError:
    """The engine gave up on a sequence (NaN/inf logits): its message, as a 500."""
    return APIError(500, message or "decoding failed", "server_error", code="decoding_error")


# ---------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # extra: clients send fields we do not use (user, metadata...). strict: JSON types as declared,
    # never converted: `true` is not the number 1, "3" not 3, 2.5 not an integer (an int is a float).
    model_config = ConfigDict(extra="ignore", strict=True)


class FusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    solver: str | None = Field(None, description=registry.grammar().replace(", ", " | "))
    experts: list[str] | None = Field(None, description="fuse only these experts (dynamic and static solvers)")
    return_weights: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self):
        if self.type == "text" and self.text is None:
            raise ValueError('a content part of type "text" needs a string field "text", like '
                             '{"type": "text", "text": "Hello"}')
        return self


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]  # a free-form role would be written into the prompt
    content: str | list[ContentPart] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------- response pieces

def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def usage(done: dict) -> dict:
    """The `usage` object of a finished request, from the scheduler's "done" event."""
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def _top_dict(top: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, logprob in top:  # best first; tokens that decode alike (e.g. partial bytes) keep the best
        out.setdefault(token, logprob)
    return out


def completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_top_dict(e["top"]) for e in entries] if any(e["top"] for e in entries) else None,
            "text_offset": [e["offset"] for e in entries]}


def chat_logprobs(entries: list[dict]) -> dict:
    def one(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [one(e["token"], e["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


@dataclass
class Reply:
    """The answer to one request in its route's shape: "text" (/v1/completions) or "chat"
    (/v1/chat/completions), as one body or as stream chunks; every piece repeats its id, creation
    time, model and fusion info."""

    kind: Literal["text", "chat"]
    id: str
    created: int
    model: str
    fusion: dict  # {"solver", "experts"}
    logprobs: bool
    weights: bool  # the request asked for the fusion weights of each step

    def _envelope(self, obj: str, choices: list[dict], **rest) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices} | rest

    def _logprobs(self, entries: list[dict]) -> dict | None:
        if not self.logprobs:
            return None
        return completion_logprobs(entries) if self.kind == "text" else chat_logprobs(entries)

    def body(self, text: str, entries: list[dict], weights: list, finish: str, usage: dict) -> dict:
        if self.kind == "text":
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": self._logprobs(entries)}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": self._logprobs(entries)}
        fusion = self.fusion | ({"weights": weights} if self.weights else {})
        obj = "text_completion" if self.kind == "text" else "chat.completion"
        return self._envelope(obj, [choice], usage=usage, fusion=fusion)

    @property
    def _chunk_object(self) -> str:
        return "text_completion" if self.kind == "text" else "chat.completion.chunk"

    def chunk(self, text: str | None, entries: list[dict], weights: list, finish: str | None,
              role: bool = False) -> str:
        """One server-sent event; the chat stream's first chunk (role=True) names the role."""
        if self.kind == "text":
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": self._logprobs(entries)}
        else:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": self._logprobs(entries)}
        out = self._envelope(self._chunk_object, [choice])
        if self.weights:
            out["fusion"] = self.fusion | {"weights": weights}
        return sse(out)

    def usage_chunk(self, usage: dict) -> str:
        return sse(self._envelope(self._chunk_object, [], usage=usage))
