"""An OpenAI-compatible HTTP server for fused models (`logitfusion serve`): a thin front end over
the engine.

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

Modules: app (create_app), routes, serving (a request's way to its answer), protocol (the API's
shapes), scheduler, tracker (what a client sees of a sequence), middleware (auth, body limits,
request metrics), metrics.
"""

from .app import NAME_PATTERN, create_app
from .protocol import APIError

__all__ = ["NAME_PATTERN", "APIError", "create_app"]
