"""The HTTP routes: health, metrics, the model list, completions and chat completions. Each hands
its work to the app's OpenAIServing (app.state.serving)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .protocol import ChatRequest, CompletionRequest
from .serving import OpenAIServing

router = APIRouter()


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


@router.get("/health")
async def health(request: Request):
    ok = request.app.state.scheduler.healthy
    return JSONResponse({"status": "ok" if ok else "unavailable", "models": list(request.app.state.fusers)},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state
    return PlainTextResponse(state.metrics.render(state.scheduler.gauges()), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(request: Request):
    return _serving(request).models()


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str):
    return _serving(request).model_card(name)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    return await _serving(request).create_completion(request, body)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest):
    return await _serving(request).create_chat_completion(request, body)
