"""Request lifecycle, scheduling, sampling and the jitted steps; `LLM` is the offline entry
point, `Engine` the one the server drives."""

from engine.config import EngineConfig
from engine.engine import Engine
from engine.limits import InvalidRequest
from engine.llm import LLM, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "InvalidRequest", "LLM", "RequestOutput", "SamplingParams"]
