"""One request of a million tokens on one GPU, and the clean refusals around it.

    python bench/long_context.py --out bench/results/long-context.json     # on the GPU machine

With the Llama-3.2-1B shape (random bf16 weights, 2**20 positions: the preset
`llama-3.2-1b-random-1m`):

1. Refusals, each a message and no stack trace: a static pool of `--huge` tokens, too large
   for the device (refused at start-up, `kvcache.PoolDoesNotFit`), and a static pool too small for the request
   (refused at admission, `InvalidRequest` naming max_tokens).
2. The hybrid layout with a pool of `--pool-tokens` serves the long request (paged: it is far
   above `--static-max-tokens`) together with a few short ones (static), all at once. Recorded:
   each request's layout and tokens, the prefill time of the long prompt (chunked,
   `--chunk` tokens a step), and its decode step time at full length against the time to read
   its KV once at the device's copy bandwidth.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

    from engine import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(
        model=args.model, layout="hybrid", static_max_tokens=args.static_max_tokens,
        max_total_tokens=args.pool_tokens, context_length=args.context, max_running_requests=4,
        chunked_prefill_size=args.chunk, num_continuous_decode_steps=8))
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    greedy = dict(temperature=0, ignore_eos=True)
    long = engine.make_request("long", rng.integers(3, vocab, args.tokens - args.output).tolist(),
                               SamplingParams(max_tokens=args.output, **greedy))
    short = [engine.make_request(f"short{i}", rng.integers(3, vocab, 200 + 100 * i).tolist(),
                                 SamplingParams(max_tokens=64, **greedy)) for i in range(3)]
    for req in [long, *short]:
        engine.add(req)
    start = time.perf_counter()
    prefilled, launches = None, []
    while engine.has_work():
        t, before = time.perf_counter(), len(long.output)
        engine.step()
        engine.sync()                     # each launch timed whole
        if long.output and prefilled is None:
            prefilled = time.perf_counter() - start
        elif before and len(long.output) - before == 8:     # a full decode launch at ~1M
            launches.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    per_step = [dt / 8 for dt in launches[1:]]              # the first one may compile
    kv_bytes = (args.tokens - 1) * engine.spec.bytes_per_token
    usage = engine.stats()
    return {
        "device": jax.devices()[0].device_kind,
        "requests": {r.rid: {"layout": r.layout, "prompt_tokens": len(r.prompt),
                             "output_tokens": len(r.output), "finish_reason": r.finish_reason}
                     for r in [long, *short]},
        "long_total_tokens": len(long.prompt) + len(long.output),
        "pool_tokens": engine.spec.capacity_tokens,
        "pool_bytes": engine.spec.total_bytes,
        "kv_bytes_of_long_request": kv_bytes,
        "prefill_seconds": prefilled,
        "prefill_tokens_per_second": len(long.prompt) / prefilled if prefilled else None,
        "decode_step_ms_at_full_length": 1e3 * float(np.median(per_step)) if per_step else None,
        "decode_kv_read_tb_per_s": (kv_bytes / float(np.median(per_step)) / 1e12
                                    if per_step else None),
        "total_seconds": total,
        "preemptions": usage["preemptions"],
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
    result["served"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
