"""Every knob of an engine, once: one name, one default, one help text, checked here before any
weights load. `LLM(model, **knobs)` takes these names, serve.py makes a flag of each
(`--max-running-requests` for max_running_requests, its --help from the help texts below), and
the engine reads nothing else."""

import dataclasses
import types
import typing

from engine import envs
from kernels import IMPLEMENTATIONS
from kvcache import LAYOUTS

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2")
KV_POOLS = ("static", "elastic")
PRECOMPILE = ("auto", "background", "all", "none")
LOCAL_KV = ("window", "full")


def knob(default, help: str, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine. Defaults serve the embedded model on any backend."""
    model: str = knob("tiny-random", "preset (tiny-random: noise text), packaged model "
                                     "(smollm2-135m-instruct: serve.py's default when its "
                                     "package is installed), HF checkpoint directory "
                                     "(config.json, safetensors, tokenizer.json) or .gguf file")
    dtype: str = knob("auto", "weights, activations and KV pages; auto: bfloat16 on an "
                              "accelerator, float32 on CPU", DTYPES)
    kv_cache_dtype: str = knob("auto", "KV pages' element type; auto: the model's dtype; "
                                       "fp8_e4m3 / fp8_e5m2 hold twice the tokens of bf16 in "
                                       "the same bytes (K and V stored unscaled: scale 1.0)",
                               KV_CACHE_DTYPES)
    layout: str = knob("hybrid", "static: reserve prompt + max tokens at admission; paged: a "
                                 "page at a time, inside the step; hybrid: static up to "
                                 "--static-max-tokens, paged above", LAYOUTS)
    static_max_tokens: int = knob(2048, "hybrid: requests of at most this many tokens (prompt + "
                                        "max tokens) are static, longer ones paged")
    page_size: int = knob(16, "tokens per KV page (a power of 2)")
    max_total_tokens: int | None = knob(None, "KV pool size in tokens; unset: from "
                                              "--mem-fraction-static")
    mem_fraction_static: float = knob(0.9, "fraction of device memory for weights + KV pool (the "
                                           "pool never exceeds what --max-running-requests full "
                                           "contexts need, nor the memory free; on a CPU, "
                                           "without --max-total-tokens, at most 1 GiB)")
    context_length: int | None = knob(None, "max tokens (prompt + output) per request; unset: "
                                            "the model's max positions")
    max_running_requests: int = knob(32, "rows of the page table: requests decoded at once")
    chunked_prefill_size: int = knob(512, "prompt tokens per step, shared by its prefill chunks")
    max_prefill_rows: int = knob(4, "prefill chunks per step")
    # 8, not 4: at 64 decoding rows of the 1B shape on the H100 a 4-step launch (~8 ms) did not
    # hide the host's work per launch (8-16% of the step not hidden), an 8-step one did (0.3%);
    # BENCHMARKS.md, serving.
    num_continuous_decode_steps: int = knob(8, "decode steps per launch when no prefill is "
                                               "pending (fewer host trips; tokens stream in "
                                               "groups of this size)")
    disable_radix_cache: bool = knob(False, "no prefix cache: finished requests free all their "
                                            "pages")
    host_kv_size: int = knob(0, "tokens of host memory for the prefix cache's host tier: pages "
                                "evicted from the pool move there and come back on a hit (0: off)")
    local_kv: str = knob("window", "KV of a model's sliding-window layers (Gemma 2 / 3) where it "
                                   "also has global ones: window keeps a ring of pages a row that "
                                   "covers the window (memory O(window), the prefix cache off); "
                                   "full keeps every page, as global layers do", LOCAL_KV)
    kv_pool: str = knob("static", "static: the whole pool at start-up; elastic: it starts at "
                                  "--kv-pool-min-tokens, grows by --kv-pool-growth times up to "
                                  "the static size when admissions need pages, and shrinks once "
                                  "oversized for --kv-shrink-after seconds", KV_POOLS)
    kv_pool_min_tokens: int = knob(2048, "elastic: the pool's smallest (and start-up) size")
    kv_pool_growth: int = knob(2, "elastic: each pool size is this many times the last")
    kv_shrink_after: float = knob(5.0, "elastic: seconds a smaller pool must have sufficed "
                                       "before the pool shrinks")
    attention_impl: str = knob(envs.ATTENTION, "attention kernels; the default comes from "
                                               "$HYBRIDKV_ATTENTION, else auto: the compiled "
                                               "kernel of the GPU/TPU backend, the jnp "
                                               "reference on CPU", IMPLEMENTATIONS)
    precompile: str = knob("auto", "when the step programs compile (engine.programs): "
                                   "background: the few largest before ready, the rest while "
                                   "serving, launches padded to compiled ones meanwhile; all: "
                                   "every one before ready; none: each when a launch first "
                                   "needs it; auto: background on a GPU/TPU, none on a CPU",
                           PRECOMPILE)
    tensor_parallel_size: int = knob(1, "devices to shard the model and the KV pages over "
                                        "(attention heads and MLP columns)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
            base = typing.get_args(kind)[0] if optional else kind
            if not (optional and value is None or _is_a(value, base)):
                raise ValueError(f"{f.name} must be {base.__name__}"
                                 f"{' or None' if optional else ''}, got {value!r}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; choose one of "
                                 f"{list(f.metadata['choices'])}")
        for name in ("max_running_requests", "chunked_prefill_size", "max_prefill_rows",
                     "num_continuous_decode_steps", "tensor_parallel_size", "kv_pool_min_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("static_max_tokens", "host_kv_size", "kv_shrink_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"max_total_tokens must be >= page_size ({self.page_size}), got "
                             f"{self.max_total_tokens}")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got "
                             f"{self.mem_fraction_static}")
        if self.kv_pool_growth < 2:
            raise ValueError(f"kv_pool_growth must be >= 2, got {self.kv_pool_growth}")
        if self.host_kv_size and (self.disable_radix_cache or self.tensor_parallel_size > 1):
            raise ValueError("host_kv_size (--host-kv-size) is a tier of the prefix cache: it "
                             "needs the radix cache on and does not support "
                             "tensor_parallel_size > 1 yet")


def _is_a(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def make_config(**knobs) -> EngineConfig:
    """EngineConfig(**knobs), with a ValueError naming an unknown knob and the known ones."""
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; the options are {names}")
    return EngineConfig(**knobs)
