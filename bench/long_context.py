"""One request of a million (or ten million) tokens on one GPU, and the clean refusals around it.

    python bench/long_context.py --out bench/results/long-context.json     # on the GPU machine
    python bench/long_context.py --model llama-2l-random-16m \
        --tokens 10000000 --context 16777216 --kv-pool elastic --pool-tokens 10100000 \
        --huge 400000000 --out bench/results/long-context-10m.json

Defaults: the Llama-3.2-1B shape (random bf16 weights, 2**20 positions: the preset
`llama-3.2-1b-random-1m`). The 10M run uses `llama-2l-random-16m`, a 2-layer shape small enough
that its prefill (~1e17 FLOPs of attention) fits one 10-minute device call.

1. Refusals, each a message and no stack trace: a static pool of `--huge` tokens, too large
   for the device (refused at start-up, `kvcache.PoolDoesNotFit`), and a static pool too small
   for the request (refused at admission, `InvalidRequest` naming max_tokens).
2. The hybrid layout with a pool of `--pool-tokens` (static, or elastic: starting at one page
   beside the weights and growing 4x at a time as the request needs) serves the long request
   (paged: it is far above `--static-max-tokens`) while short requests (static) keep arriving:
   `--short` at a time, a new one whenever one ends, until the long one ends. Recorded: each
   request's layout and tokens, the prefill time of the long prompt (chunked, `--chunk` tokens a
   step) and its attention FLOP/s counted over every layer, its decode step at full length
   against its floor ((weight bytes + live KV bytes) / the copy bandwidth measured in the same
   run), peak device memory, and the bytes of the page table and the allocator's state.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))    # bench/e2e.py, after the packages

MODEL = "llama-3.2-1b-random-1m"


def refusals(args) -> dict:
    from engine import Engine, EngineConfig, SamplingParams
    from engine.limits import InvalidRequest
    from kvcache import PoolDoesNotFit
    out = {}
    try:
        Engine(EngineConfig(model=args.model, layout="static", max_total_tokens=args.huge,
                            context_length=args.context, max_running_requests=1))
        out["startup_huge_static_pool"] = "started (not refused)"
    except PoolDoesNotFit as e:
        out["startup_huge_static_pool"] = str(e)
    engine = Engine(EngineConfig(model=args.model, layout="static", max_total_tokens=args.tokens // 2,
                                 context_length=args.context, max_running_requests=1))
    try:
        engine.make_request("long", [5] * (args.tokens - args.output),
                            SamplingParams(max_tokens=args.output))
        out["admission_small_static_pool"] = "admitted (not refused)"
    except InvalidRequest as e:
        out["admission_small_static_pool"] = f"{e.param}: {e}"
    return out


def serve_long(args) -> dict:
    import jax
    from e2e import copy_bandwidth

    import kvcache
    from engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(
        model=args.model, layout="hybrid", static_max_tokens=args.static_max_tokens,
        max_total_tokens=args.pool_tokens, context_length=args.context,
        max_running_requests=args.short + 1, chunked_prefill_size=args.chunk,
        num_continuous_decode_steps=8, kv_pool=args.kv_pool, kv_pool_min_tokens=16,
        kv_pool_growth=4))
    cfg = engine.model_config
    rng = np.random.default_rng(0)
    greedy = dict(temperature=0, ignore_eos=True)
    prompt = rng.integers(3, cfg.vocab_size, args.tokens - args.output).tolist()
    long = engine.make_request("long", prompt, SamplingParams(max_tokens=args.output, **greedy))
    del prompt
    short = []

    def add_short():
        i = len(short)
        short.append(engine.make_request(f"short{i}", rng.integers(3, cfg.vocab_size,
                                                                   200 + 100 * (i % 3)).tolist(),
                                          SamplingParams(max_tokens=64, **greedy)))
        engine.add(short[-1])

    engine.add(long)
    for _ in range(args.short):
        add_short()
    start = time.perf_counter()
    prefilled, launches = None, []
    while engine.has_work():
        t, before = time.perf_counter(), len(long.output)
        engine.step()
        engine.sync()                     # each launch timed whole
        if long.output and prefilled is None:
            prefilled = time.perf_counter() - start
        elif before and len(long.output) - before == 8:     # a full decode launch at full length
            launches.append(time.perf_counter() - t)
        if long.finish_reason is None:            # keep --short of them running
            for _ in range(args.short - sum(r.finish_reason is None for r in short)):
                add_short()
    total = time.perf_counter() - start
    per_step = float(np.median([dt / 8 for dt in launches[1:]])) if launches[1:] else None
    kv_bytes = (args.tokens - 1) * engine.spec.bytes_per_token
    weight_bytes = kvcache.nbytes(engine.params)
    bandwidth = copy_bandwidth()
    floor = (weight_bytes + kv_bytes) / bandwidth
    p = len(long.prompt)
    flops = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * p * (p + 1) // 2
    cache = engine.runner.cache
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "device": jax.devices()[0].device_kind,
        "requests": {r.rid: {"layout": r.layout, "prompt_tokens": len(r.prompt),
                             "output_tokens": len(r.output), "finish_reason": r.finish_reason}
                     for r in [long, *short]},
        "long_total_tokens": len(long.prompt) + len(long.output),
        "short_requests_served": sum(len(r.output) == 64 for r in short),
        "kv_pool": args.kv_pool,
        "pool_tokens": engine.spec.capacity_tokens,
        "pool_tokens_at_end": (cache.num_pages - 1) * cache.page_size,
        "pool_bytes": engine.spec.total_bytes,
        "weight_bytes": weight_bytes,
        "kv_bytes_of_long_request": kv_bytes,
        "prefill_seconds": prefilled,
        "prefill_tokens_per_second": p / prefilled if prefilled else None,
        "prefill_attention_flops_all_layers": flops,
        "prefill_attention_tflop_s": flops / prefilled / 1e12 if prefilled else None,
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "decode_step_ms_at_full_length": 1e3 * per_step if per_step else None,
        "decode_floor_ms": 1e3 * floor,
        "decode_step_vs_floor": per_step / floor if per_step else None,
        "decode_kv_read_tb_per_s": kv_bytes / per_step / 1e12 if per_step else None,
        "peak_device_bytes": memory.get("peak_bytes_in_use"),
        "page_table_bytes": cache.page_table.nbytes,
        "allocator_bytes": kvcache.nbytes(cache.alloc),
        "total_seconds": total,
        "preemptions": engine.stats()["preemptions"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/long-context.json"))
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tokens", type=int, default=1_000_000, help="prompt + output of the request")
    p.add_argument("--huge", type=int, default=10_000_000,
                   help="tokens of a static pool that cannot fit (refused at start-up)")
    p.add_argument("--output", type=int, default=64, help="its output tokens")
    p.add_argument("--pool-tokens", type=int, default=1_001_472)
    p.add_argument("--context", type=int, default=1 << 20)
    p.add_argument("--static-max-tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--kv-pool", choices=["static", "elastic"], default="static")
    p.add_argument("--short", type=int, default=3, help="short requests running at a time")
    args = p.parse_args()
    result = {"date": datetime.date.today().isoformat(), "model": args.model,
              "command": " ".join(["python", "bench/long_context.py", *sys.argv[1:]]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "refusals": refusals(args)}
    result |= serve_long(args)
    long = result["requests"]["long"]
    ok = (long["layout"] == "paged" and long["output_tokens"] == args.output
          and all(r["layout"] == "static" and r["output_tokens"] == 64
                  for k, r in result["requests"].items() if k != "long"))
    result["requests"] = {k: r for k, r in result["requests"].items()      # keep the file small
                          if k == "long" or int(k[5:]) < 2 * args.short}
    result["served"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
