"""The app: `create_app` checks its limits and assembles the scheduler, the metrics, the serving
logic, the guard middleware, the OpenAI-format error handlers and the routes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import limits
from ..engine.fuser import Fuser
from .metrics import Metrics
from .middleware import GuardMiddleware
from .protocol import INTERNAL, APIError
from .routes import router
from .scheduler import Scheduler
from .serving import OpenAIServing

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = limits.SERVER_MAX_BATCH  # the bounds live in limits.py; these names are the server's
DEFAULT_MAX_QUEUE = limits.SERVER_MAX_QUEUE
DEFAULT_MAX_TOKENS_LIMIT = limits.SERVER_MAX_TOKENS
DEFAULT_MAX_BODY_BYTES = limits.SERVER_MAX_BODY_BYTES
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:/\-]+$")


def create_app(fusers: dict[str, Fuser], api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_batch: int = DEFAULT_MAX_BATCH, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app serving each Fuser under its name (the request's `model`)."""
    _check_limits(fusers, max_queue, max_batch, max_tokens_limit, max_body_bytes)
    metrics = Metrics()
    scheduler = Scheduler(max_batch, max_queue, metrics)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="logitfusion", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.fusers = scheduler, metrics, fusers
    app.state.max_tokens_limit = max_tokens_limit
    app.state.serving = OpenAIServing(fusers, scheduler, max_tokens_limit)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    _add_error_handlers(app)
    app.include_router(router)
    return app


def _check_limits(fusers: dict[str, Fuser], max_queue: int, max_batch: int, max_tokens_limit: int,
                  max_body_bytes: int) -> None:
    if not fusers:
        raise ValueError("create_app needs at least one model: {name: Fuser}")
    bad = [n for n in fusers if not NAME_PATTERN.match(n)]
    if bad:
        raise ValueError(f"model names {bad} must match {NAME_PATTERN.pattern}")
    if max_batch < 1 or max_queue < 0 or max_tokens_limit < 1 or max_body_bytes < 1:
        raise ValueError("max_batch, max_tokens_limit and max_body_bytes must be >= 1, max_queue >= 0")
    if max_tokens_limit > limits.MAX_NEW_TOKENS:
        raise ValueError(f"max_tokens_limit must be at most {limits.MAX_NEW_TOKENS}, got {max_tokens_limit}")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error a client sees, FastAPI's and Starlette's included, in the OpenAI format."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
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


UNION_TAGS = re.compile(r"^(str|int|float|bool|none|function-\w+\[.*\]|\w+\[.*\])$")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the deepest one (inside a union such as `content`, the
    member the value was meant for), where it is, what was wrong and the value given."""
    if not errors:
        return "body: invalid value", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not UNION_TAGS.match(str(x))]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}"
    if "input" in first and first.get("type") != "value_error" and not isinstance(first["input"], (dict, list)):
        message += f", got {json.dumps(first['input'], ensure_ascii=True)[:60]}"
    others = sorted({str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1} - {loc[0] if loc else ""})
    if others:
        message += f" (and problems in {', '.join(others[:5])})"
    return message, loc[0] if loc else None


def _version() -> str:
    from .. import __version__
    return __version__
