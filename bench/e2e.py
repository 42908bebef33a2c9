"""End-to-end decode speed on the GPU: the engine's jitted decode loop against the bandwidth
floor and against HF transformers, per layout, in one run.

    python bench/e2e.py --out bench/results/e2e.json

For each model shape and batch size, B rows hold `--context` tokens each and decode together
through `engine.step.decode_loop` (the call the server makes, `--decode-steps` steps a launch,
cache donated). Measured per decode step, the cases taking turns on one engine:

- static: every row reserved its pages (prompt + every decode token) at admission, one
  contiguous run per row;
- paged-reserved: the paged layout, pages interleaved between rows as decode growth leaves
  them, all reserved ahead (no allocation in the measured steps);
- paged: the same, but rows hold only their prompt's pages and take the next page inside the
  step (vLLM's behaviour);
- hybrid: even rows static, odd rows paged.

The floor is (weight bytes + live KV bytes) / copy bandwidth, the copy bandwidth measured here
as bytes read + written per second by a device copy. A mixture of experts counts the experts
its batch is expected to route to (`step_weight_bytes`); layers with window-sized KV count
their window. HF transformers `generate` runs the same
shapes (random bf16 weights, SDPA, its default dynamic cache) in subprocesses, its decode step
taken as the difference of two generation lengths so that its prefill cancels out.
`--hf-only` runs just those; `--hf-from FILE` reuses them. (Its static cache is not timed: it
compiles per cache length, so differencing two lengths would time compilation; at batch 64 it
is the slower mode anyway, 1268 ms a step for the 8B shape in issue 6's own measurement.)

`--profile DIR` also records a JAX profiler trace of a few launches per case and writes the
device time per kernel name (top entries) into the JSON.
"""

import argparse
import dataclasses
import datetime
import gzip
import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE = 16


def copy_bandwidth(nbytes: int = 2 << 30, rounds: int = 7) -> float:
    """Bytes read + written per second by a device copy of nbytes: the best of `rounds`
    rounds of 10 copies (a ceiling, so the fastest round; a slow round would lower the floor)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones(nbytes // 2, jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(10):
            y = copy(x)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - start) / 10)
    return 2 * nbytes / min(times)


CASES = {
    # name: (layout per row, pages reserved ahead for the decode tokens)
    "static": ("static", True),
    "paged-reserved": ("paged", True),
    "paged": ("paged", False),
    "hybrid": (None, False),
}


def prepare(engine, case: str, batch: int, context: int, ahead: int):
    """A fresh cache whose rows 0..B-1 hold `context` tokens each (K/V left as zeros) and a
    random next token, and the decode state (packed, as the engine's decode launch takes it,
    and on the device) that decodes them all, greedily, without stopping.

    static rows take their pages at admission, one contiguous run each, for context + ahead
    tokens. paged rows are admitted empty and grow one page per row in turn, so their pages
    interleave as decode growth leaves them; "paged-reserved" grows them for context + ahead
    tokens (no allocation happens in the measured steps), "paged" for the context only (the
    step takes the next page itself). "hybrid": even rows static, odd rows paged.
    """
    import jax

    import kvcache
    from engine.sampling import PLAIN
    from engine.shapes import bucket
    from engine.step import DecodeState, SamplingArrays
    kind, reserved = CASES[case]
    kinds = [kind or ("static" if b % 2 == 0 else "paged") for b in range(batch)]
    rows = np.arange(batch, dtype=np.int32)
    pages = [math.ceil((context + (ahead if reserved or k == "static" else 0)) / PAGE)
             for k in kinds]
    engine.cache = None
    engine.cache = engine.runner.new_cache(engine.spec.num_pages)    # ring pools included
    layout = np.asarray([kvcache.LAYOUT_CODES[k] for k in kinds], np.int32)
    reserve = np.asarray([n if k == "static" else 0 for k, n in zip(kinds, pages)], np.int32)
    admit = jax.jit(kvcache.admit_rows, static_argnums=4, donate_argnums=0)
    engine.cache, ok = admit(engine.cache, rows, layout, reserve,
                             bucket(int(reserve.max()), 1, engine.pages_per_row),
                             np.zeros((batch, engine.pages_per_row), np.int32),
                             np.zeros(batch, np.int32))
    grow = jax.jit(kvcache.grow_rows, static_argnums=3, donate_argnums=0)
    for i in range(max(pages)):
        need = np.asarray([k == "paged" and i < n for k, n in zip(kinds, pages)], np.int32)
        if need.any():
            engine.cache, grown = grow(engine.cache, rows, need, 1)
            ok &= grown
    assert np.asarray(ok).all(), "the pool refused the benchmark's pages"
    rng = np.random.default_rng(0)
    engine.cache = dataclasses.replace(
        engine.cache, lengths=engine.cache.lengths.at[:].set(context),
        next_token=jax.numpy.asarray(rng.integers(0, 32000, batch), np.int32))
    return DecodeState(
        rows=rows, tokens=np.full(batch, -1, np.int32), active=np.ones(batch, bool),
        remaining=np.full(batch, 1 << 30, np.int32), stop_ids=np.full((batch, 4), -1, np.int32),
        sampling=SamplingArrays(temperature=np.zeros(batch, np.float32),
                                top_k=np.zeros(batch, np.int32),
                                top_p=np.ones(batch, np.float32),
                                seed=np.zeros(batch, np.uint32), level=PLAIN))


def run_loop(engine, state, launches: int, steps: int) -> float:
    """launches back-to-back decode launches of `steps` steps; returns seconds per step."""
    start = time.perf_counter()
    for _ in range(launches):
        out, key = engine.runner.decode(state, steps)
    result = engine.runner.result(out, key)
    elapsed = time.perf_counter() - start
    assert not result.stalled.any(), "a row stalled for pages"
    assert (result.tokens >= 0).all(), "a row stopped producing tokens"
    return elapsed / (launches * steps)


def device_kernel_times(trace_dir: Path, top: int = 25) -> list[dict]:
    """Device time per kernel name from a jax.profiler trace, largest first."""
    [path] = trace_dir.glob("plugins/profile/*/*.trace.json.gz")
    trace = json.loads(gzip.decompress(path.read_bytes()))
    events = trace["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") ==
                "process_name" and "GPU" in str(e.get("args", {}).get("name", ""))}
    total, count = Counter(), Counter()
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids),
                     key=lambda e: e["ts"])
    for e in kernels:
        total[e["name"]] += e.get("dur", 0)
        count[e["name"]] += 1
    # Idle device time between consecutive kernels, by the kernel that ends before the gap.
    idle = Counter()
    end = kernels[0]["ts"] if kernels else 0
    last = None
    for e in kernels:
        if e["ts"] > end and last is not None:
            idle["idle after " + last] += e["ts"] - end
        if e["ts"] + e.get("dur", 0) >= end:
            end, last = e["ts"] + e.get("dur", 0), e["name"]
    rows = [{"name": n[:160], "us": round(us, 1), "calls": count[n]}
            for n, us in total.most_common(top)]
    rows += [{"name": n[:160], "us": round(us, 1), "calls": 0} for n, us in idle.most_common(8)]
    rows.append({"name": "idle total", "us": round(sum(idle.values()), 1), "calls": 0})
    return rows


def step_weight_bytes(engine, batch: int) -> int:
    """Weight bytes a decode step of `batch` rows reads: every weight, but a mixture of
    experts' sparse layers read only the experts their tokens route to, expected
    E * (1 - (1 - k / E) ** batch) of E under uniform routing (k of E a token; exact at batch
    1, and the random weights route about uniformly)."""
    import kvcache
    cfg = engine.model_config
    total = kvcache.nbytes(engine.params)
    e, k = cfg.num_experts, cfg.experts_per_token
    for i, sparse in enumerate(cfg.moe_layers):
        if sparse:
            experts = kvcache.nbytes(engine.params["layers"][i]["mlp"]["experts"])
            total -= round(experts * (1 - k / e) ** batch)
    return total


def bench_engine(model: str, batch: int, context: int, steps: int, launches: int,
                 repeats: int, profile: Path | None, kv_cache_dtype: str = "auto") -> list[dict]:
    """Every case of CASES on one engine (same weights, same compiled loop), the cases taking
    turns `repeats` times; the median per case is kept."""
    import jax

    import kvcache
    from engine import Engine, EngineConfig
    ahead = steps * (launches + 1)
    engine = Engine(EngineConfig(
        model=model, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
        max_running_requests=batch,
        context_length=context + ahead + PAGE,
        max_total_tokens=batch * (context + ahead + 2 * PAGE), num_continuous_decode_steps=steps))
    times = {case: [] for case in CASES}
    for _ in range(repeats):
        for case in CASES:
            state = prepare(engine, case, batch, context, ahead)
            run_loop(engine, state, 1, steps)       # compiles, the first time
            seconds = run_loop(engine, state, launches, steps)
            times[case].append(seconds)
    # Live KV: the mean over the measured steps (rows start at context + one warm-up launch);
    # layers in ring pools (window-sized KV) read their window at most.
    tokens = context + steps + steps * launches // 2
    cfg, ring_layers = engine.model_config, engine.ring[0]
    window = max((cfg.window(i) or 0) for i in range(cfg.num_layers))
    layer_token = engine.spec.bytes_per_token // engine.spec.num_layers
    live_kv = batch * (tokens * engine.spec.bytes_per_token
                       + ring_layers * min(window, tokens) * layer_token)
    rows = []
    for case, seconds in times.items():
        per_step = statistics.median(seconds)
        rows.append({"model": model, "batch": batch, "context": context, "layout": case,
                     "step_ms": per_step * 1e3, "step_ms_runs": [t * 1e3 for t in seconds],
                     "tokens_per_s": batch / per_step,
                     "weight_bytes": step_weight_bytes(engine, batch),
                     "all_weight_bytes": kvcache.nbytes(engine.params),
                     "live_kv_bytes": live_kv})
        print(json.dumps(rows[-1]), flush=True)
    if profile is not None:
        state = prepare(engine, "paged", batch, context, ahead)
        trace_dir = profile / f"{model}-b{batch}"
        with jax.profiler.trace(str(trace_dir)):
            run_loop(engine, state, 2, steps)
        rows[list(CASES).index("paged")]["kernels_us_per_step"] = [
            k | {"us": round(k["us"] / (2 * steps), 1)} for k in device_kernel_times(trace_dir)]
    return rows


LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0)
HF_SHAPES = {
    "llama-3.2-1b-random": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                tie_word_embeddings=True, **LLAMA3),
    "llama-3-8b-random": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              tie_word_embeddings=False, **LLAMA3),
    # The real SmolLM2-135M-Instruct's shape (models/packaged.py); HF runs it with random weights.
    "smollm2-135m-instruct": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                  tie_word_embeddings=True, vocab_size=49152,
                                  rope_theta=100000.0),
}


def bench_hf(model: str, batch: int, context: int) -> dict:
    """HF transformers' decode step (seconds) at this batch and prompt length."""
    import torch
    import transformers
    cfg = transformers.LlamaConfig(max_position_embeddings=context + 256, **HF_SHAPES[model])
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, min(32000, cfg.vocab_size), (batch, context), device="cuda")

    def generate(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    short, long = 2, 10
    generate(short)
    per_step = statistics.median((generate(long) - generate(short)) / (long - short)
                                 for _ in range(2))
    return {"model": model, "batch": batch, "context": context, "cache": "dynamic",
            "step_ms": per_step * 1e3, "tokens_per_s": batch / per_step,
            "transformers": transformers.__version__, "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b-random", "llama-3-8b-random"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--launches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-batches", nargs="*", type=int, default=[1, 16, 64])
    p.add_argument("--hf-only", action="store_true", help="time HF transformers only")
    p.add_argument("--hf-from", type=Path, help="take the HF rows from this earlier JSON")
    p.add_argument("--profile", type=Path, help="write profiler traces and HLO here")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="the engine's KV pages (engine.config.KV_CACHE_DTYPES); the floor counts "
                        "their bytes")
    p.add_argument("--out", type=Path, default=Path("bench/results/e2e.json"))
    p.add_argument("--hf-case", help=argparse.SUPPRESS)     # model:batch, in a subprocess
    args = p.parse_args()
    if args.hf_case:
        model, batch = args.hf_case.split(":")
        print(json.dumps(bench_hf(model, int(batch), args.context)))
        return

    hf_rows = json.loads(args.hf_from.read_text())["hf"] if args.hf_from else []
    cases = [(m, b) for m in args.models for b in args.hf_batches]
    for model, batch in cases if not args.hf_from else []:
        done = subprocess.run([sys.executable, __file__, "--context", str(args.context),
                               "--hf-case", f"{model}:{batch}"], capture_output=True, text=True)
        if done.returncode:
            hf_rows.append({"model": model, "batch": batch,
                            "error": done.stderr.strip().splitlines()[-1]})
        else:
            hf_rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(hf_rows[-1]), flush=True)
    if args.hf_only:
        args.out.write_text(json.dumps({"hf": hf_rows}, indent=1))
        return

    import jax
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for model in args.models:
        for batch in args.batches:
            rows += bench_engine(model, batch, args.context, args.decode_steps, args.launches,
                                 args.repeats, args.profile, args.kv_cache_dtype)
    bandwidth = max(bandwidth, copy_bandwidth())      # measured before and after: the best
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    for row in rows:
        floor = (row["weight_bytes"] + row["live_kv_bytes"]) / bandwidth
        row |= {"floor_ms": floor * 1e3, "step_over_floor": row["step_ms"] / 1e3 / floor}
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "copy_bandwidth_tb_s": bandwidth / 1e12, "engine": rows, "hf": hf_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
