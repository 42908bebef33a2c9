import functools

import pytest
from starlette.testclient import TestClient

import serve
from server.app import build_app
from server.bridge import AsyncEngine
from server.metrics import Metrics


@pytest.fixture(scope="module")
def client(request, tmp_path_factory):
    """The real ASGI app over a real engine process, driven in-process, as the requesting module
    sets it up: its FLAGS (serve.py's), MODEL, KEY (--api-key) and MAX_BYTES."""
    m = request.module
    cache = tmp_path_factory.mktemp("jax-cache")
    args = serve.parse_args([*m.FLAGS, "--compilation-cache-dir", str(cache)])
    engine = AsyncEngine(functools.partial(serve.start_engine, args), Metrics())
    engine.start()
    app = build_app(engine, m.MODEL, api_key=m.KEY, max_request_bytes=m.MAX_BYTES)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c
    finally:
        engine.shutdown()
