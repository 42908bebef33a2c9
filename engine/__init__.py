"""Request lifecycle, sampling and the jitted decode step; `LLM` is the offline entry point."""

from engine.llm import LLM, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
