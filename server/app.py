"""The HTTP API: OpenAI-compatible completions and chat (streamed as SSE or not), SGLang's
native /generate, /v1/models, /health, /metrics (Prometheus) and /flush_cache, over an engine
in a process of its own (server.bridge). Errors: server.errors. A client that disconnects
aborts its requests, which frees their rows and pages at the next step.
"""

from fastapi import FastAPI

from engine import limits
from server import errors, native_api, openai_api
from server.bridge import AsyncEngine
from server.serving import Serving


def build_app(engine: AsyncEngine, model_name: str, *, api_key: str | None = None,
              max_request_bytes: int = limits.MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="hybridkv", version="0.1")
    app.state.serving = Serving(engine, model_name)
    errors.install(app, api_key=api_key, max_request_bytes=max_request_bytes)
    app.include_router(openai_api.router)
    app.include_router(native_api.router)
    return app
