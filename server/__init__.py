"""The HTTP front: an OpenAI-compatible API (and SGLang's /generate) over an engine that runs
in a process of its own. The engine never imports this package."""

from server.app import build_app
from server.bridge import AsyncEngine
from server.metrics import Metrics

__all__ = ["AsyncEngine", "Metrics", "build_app"]
