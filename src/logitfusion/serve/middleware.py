"""The HTTP guard in front of every route: the bearer API key (401), bounded request bodies (413),
JSON bodies on the JSON routes (415), and the request metrics (count, latency to the last byte)."""

from __future__ import annotations

import hmac
import json
import time

from ..engine.limits import MAX_JSON_DEPTH
from .metrics import Metrics
from .protocol import APIError

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
JSON_ROUTES = ("/v1/completions", "/v1/chat/completions")


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
                if path in JSON_ROUTES and body:
                    problem = json_problem(bytes(body))
                    if problem:
                        return await _send_json(send_tracked, 400, APIError(400, problem, code="invalid_json").body())
                    if b"content-type" not in headers:  # read as JSON, as _is_json says
                        scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
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


def _depth(value) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def json_problem(body: bytes) -> str | None:
    """Why a JSON route's body cannot be read, in words a client can act on: not UTF-8, not JSON,
    or nested deeper than limits.MAX_JSON_DEPTH (a request needs a few levels)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not valid UTF-8 (byte {e.start}); send JSON text encoded as UTF-8"
    too_deep = (f"the request body is JSON nested more than {MAX_JSON_DEPTH} levels deep; a request needs a few "
                "(messages, content parts, tools)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        return too_deep
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        return too_deep
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: http.disconnect

    return replay
