"""Online serving benchmark: streams completions from an OpenAI-compatible server under load.

    python bench/serving.py --base-url http://127.0.0.1:8000 --dataset generated-shared-prefix \
        --request-rate inf --max-concurrency 32

Prompts are token ids made here (seeded, no download): `random` lengths, `sharegpt-like`
lognormal lengths, or `generated-shared-prefix` groups (one system prompt per group + a question
per prompt). Requests arrive as a Poisson process (--request-rate, inf = all at once), at most
--max-concurrency in flight. Per request: TTFT, the gaps between token-bearing chunks (ITL),
TPOT, end-to-end latency and the cached prompt tokens the server reports in `usage`. The prefix
hit rate is set against what an ideal page-granular cache would hit on the same request order.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

FIRST_TOKEN_ID = 4   # ids below this are left to special tokens
# sharegpt-like: lognormal lengths, median = exp(mu); sigma sets the tail (mean = median *
# exp(sigma^2 / 2): ~330 prompt and ~206 output tokens before clipping).
PROMPT_MEDIAN, PROMPT_SIGMA = 200, 1.0
OUTPUT_MEDIAN, OUTPUT_SIGMA = 150, 0.8
HIT_COUNTER = "hybridkv_prefix_cache_hit_tokens_total"
PROMPT_COUNTER = "hybridkv_prompt_tokens_total"
# Engine timing counters (optional): wall time the engine was busy, the device's time in model
# launches, and model steps run; busy minus device time is host work the device waited on.
STEP_COUNTER = "hybridkv_engine_step_seconds_total"
BUSY_COUNTER = "hybridkv_engine_device_busy_seconds_total"
DEVICE_STEPS_COUNTER = "hybridkv_device_steps_total"
TIMING_COUNTERS = (STEP_COUNTER, BUSY_COUNTER, DEVICE_STEPS_COUNTER)
# XLA compilations in the server process: a timed run that compiles measures the compiler too.
COMPILES_COUNTER = "hybridkv_xla_compiles_total"
COUNTERS = (HIT_COUNTER, PROMPT_COUNTER, *TIMING_COUNTERS, COMPILES_COUNTER)


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    output_len: int


@dataclasses.dataclass(slots=True)
class Result:
    prompt_tokens: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0            # seconds to the first token-bearing chunk
    latency: float = 0.0         # seconds to the end of the stream
    itl: list[float] = dataclasses.field(default_factory=list)  # one gap per later chunk
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens in each chunk
    output_tokens: int = 0       # usage.completion_tokens (streamed count without usage)
    cached_tokens: int = 0


def random_tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab, size=n).tolist()


def make_dataset(args) -> list[Request]:
    """The requests in the order they are sent; the same args give the same requests."""
    rng = np.random.default_rng(args.seed)
    if args.dataset == "generated-shared-prefix":
        systems = [random_tokens(rng, args.gsp_system_prompt_len, args.vocab_size)
                   for _ in range(args.gsp_num_groups)]
        requests = [Request(system + random_tokens(rng, args.gsp_question_len, args.vocab_size),
                            args.gsp_output_len)
                    for system in systems for _ in range(args.gsp_prompts_per_group)]
        return [requests[i] for i in rng.permutation(len(requests))]
    n = 200 if args.num_prompts is None else args.num_prompts
    if args.dataset == "random":
        def lengths(full):
            return rng.integers(max(1, int(args.random_range_ratio * full)), full + 1, size=n)
        inputs, outputs = lengths(args.random_input_len), lengths(args.random_output_len)
    elif args.dataset == "sharegpt-like":
        inputs = np.clip(np.rint(rng.lognormal(math.log(PROMPT_MEDIAN), PROMPT_SIGMA, n)),
                         4, args.max_input_len).astype(int)
        outputs = np.clip(np.rint(rng.lognormal(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA, n)),
                          1, args.max_output_len).astype(int)
    else:
        raise ValueError(f"unknown dataset {args.dataset!r}")
    return [Request(random_tokens(rng, int(i), args.vocab_size), int(o))
            for i, o in zip(inputs, outputs)]


def optimum_cached_tokens(requests: list[Request], page_size: int) -> int:
    """Prompt tokens an ideal cache hits when the requests run one after another in this order:
    each prompt's longest prefix of whole pages already seen in an earlier prompt, keeping at
    least its last token to compute (a prompt of exactly cached pages re-runs its last page).
    For generated-shared-prefix that is (prompts per group - 1) x the system prompt rounded down
    to whole pages, per group."""
    seen, hit = set(), 0
    for req in requests:
        key, matching = None, True
        for page in range(len(req.prompt) // page_size):
            key = hash((key, tuple(req.prompt[page * page_size:(page + 1) * page_size])))
            if matching and key in seen and (page + 1) * page_size < len(req.prompt):
                hit += page_size
            else:
                matching = False
            seen.add(key)
    return hit


def summarize_dataset(requests: list[Request], args) -> dict:
    def spread(xs):
        return {"mean": float(np.mean(xs)), "min": int(min(xs)), "max": int(max(xs))}
    prompt_lens = [len(r.prompt) for r in requests]
    optimum = optimum_cached_tokens(requests, args.page_size)
    return {"name": args.dataset, "num_requests": len(requests),
            "prompt_len": spread(prompt_lens),
            "output_len": spread([r.output_len for r in requests]),
            "total_prompt_tokens": sum(prompt_lens),
            "total_output_tokens": sum(r.output_len for r in requests),
            "page_size": args.page_size, "optimum_cached_tokens": optimum,
            "optimum_hit_rate": optimum / sum(prompt_lens)}


class SteadyWindow:
    """Scrapes the server's counters when the load first has `full` requests decoding at once
    (each has its first token, none has ended) and again when the first of them ends: the
    engine's host time in that window is per decode step at full batch, with no prefill in it.
    With more requests than `full` (a request rate, or more prompts than --max-concurrency)
    the window may never form; its counters then stay None."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, full: int):
        self.client, self.base_url, self.full = client, base_url, full
        self.decoding, self.open = 0, False
        self.scrapes: list[asyncio.Task] = []

    def first_token(self) -> None:
        self.decoding += 1
        if self.decoding == self.full and not self.scrapes:
            self.open = True
            self.scrapes.append(asyncio.create_task(scrape_counters(self.client, self.base_url)))

    def ended(self) -> None:
        self.decoding -= 1
        if self.open:
            self.open = False
            self.scrapes.append(asyncio.create_task(scrape_counters(self.client, self.base_url)))

    async def counters(self) -> tuple:
        got = await asyncio.gather(*self.scrapes)
        return tuple(got) if len(got) == 2 else (None, None)


async def send(client: httpx.AsyncClient, model: str, req: Request, args,
               window: SteadyWindow | None = None) -> Result:
    """One streamed completion; failures come back as Result(ok=False, error=...), never raise."""
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
               "ignore_eos": True}
    if args.logprobs is not None:
        payload["logprobs"] = args.logprobs
    payload |= args.fields
    res, usage = Result(prompt_tokens=len(req.prompt)), None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{args.base_url}/v1/completions", json=payload) as r:
            if r.status_code != 200:
                body = (await r.aread())[:200].decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                choice = (chunk.get("choices") or [{}])[0]
                # token_ids is our extension; a server without it counts as one token a chunk.
                n = len(choice.get("token_ids") or ()) or int(bool(choice.get("text")))
                if n == 0:
                    continue
                now = time.perf_counter()
                if res.chunk_tokens:
                    res.itl.append(now - last)
                else:
                    res.ttft = now - start
                    if window:
                        window.first_token()
                res.chunk_tokens.append(n)
                last = now
        res.latency = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    finally:
        if window and res.chunk_tokens:
            window.ended()
    if not res.chunk_tokens:
        res.error = "the stream carried no tokens"
        return res
    res.output_tokens = sum(res.chunk_tokens)
    if usage:
        res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
        res.output_tokens = usage.get("completion_tokens", res.output_tokens)
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    res.ok = True
    return res


async def scrape_counters(client: httpx.AsyncClient, base_url: str) -> dict | None:
    """The server's counters from /metrics, summed over labels; None when the prefix-cache
    ones are absent."""
    try:
        r = await client.get(f"{base_url}/metrics", timeout=5)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    totals = {}
    for m in re.finditer(r"^([A-Za-z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)", r.text, re.M):
        if m[1] in COUNTERS:
            totals[m[1]] = totals.get(m[1], 0.0) + float(m[2])
    return totals if HIT_COUNTER in totals and PROMPT_COUNTER in totals else None


async def run_load(client, model, requests, args, window=None) -> tuple[list[Result], float]:
    rate = args.request_rate
    gaps = (np.zeros(len(requests)) if math.isinf(rate) else
            np.random.default_rng([args.seed, 1]).exponential(1 / rate, len(requests)))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")

    async def one(req):
        async with limit or contextlib.nullcontext():
            res = await send(client, model, req, args, window)
        bar.update()
        return res

    start, tasks = time.perf_counter(), []
    for i, req in enumerate(requests):
        if i and gaps[i]:
            await asyncio.sleep(gaps[i])
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


def ms_stats(seconds: list[float]) -> dict:
    x = np.asarray(seconds) * 1e3
    stats = {"mean": np.mean, "p50": np.median, "p99": lambda x: np.percentile(x, 99)}
    return {k: float(f(x)) if len(x) else None for k, f in stats.items()}


def ratio(a, b):
    return a / b if b else None


def engine_timing(before: dict | None, after: dict | None) -> dict:
    """The engine's wall time per model step and the part of it that was host work the device
    waited for, between two counter scrapes."""
    timing = {"host_fraction": None, "host_ms_per_step": None, "ms_per_step": None, "steps": None}
    if before and after and all(c in before and c in after for c in TIMING_COUNTERS):
        wall, busy, steps = (after[c] - before[c] for c in TIMING_COUNTERS)
        if wall and steps:
            timing = {"host_fraction": (wall - busy) / wall,
                      "host_ms_per_step": (wall - busy) / steps * 1e3,
                      "ms_per_step": wall / steps * 1e3, "steps": steps}
    return timing


def compute_metrics(results: list[Result], requests: list[Request], duration: float,
                    optimum_hit_rate: float, counters: tuple, steady: tuple = (None, None)
                    ) -> dict:
    done = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    chunks = [n for r in done for n in r.chunk_tokens]
    hit_rate = ratio(cached, prompt)
    before, after = counters
    server_hit_rate = compiles = None
    if before and after:
        server_hit_rate = ratio(after[HIT_COUNTER] - before[HIT_COUNTER],
                                after[PROMPT_COUNTER] - before[PROMPT_COUNTER])
        if COMPILES_COUNTER in before and COMPILES_COUNTER in after:
            compiles = int(after[COMPILES_COUNTER] - before[COMPILES_COUNTER])
    timing, full = engine_timing(before, after), engine_timing(*steady)
    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": list(dict.fromkeys(r.error for r in results if not r.ok))[:5],  # distinct
        "duration_s": duration, "request_throughput": len(done) / duration,
        "input_throughput": prompt / duration, "output_throughput": output / duration,
        "total_input_tokens": prompt, "total_output_tokens": output,
        "total_cached_tokens": cached,
        "streamed_output_tokens": sum(chunks),
        "shorter_than_requested": sum(r.output_tokens < q.output_len
                                      for r, q in zip(results, requests) if r.ok),
        "mean_concurrency": sum(r.latency for r in done) / duration,
        "ttft_ms": ms_stats([r.ttft for r in done]),
        "tpot_ms": ms_stats([(r.latency - r.ttft) / (r.output_tokens - 1)
                             for r in done if r.output_tokens > 1]),
        "itl_ms": ms_stats([gap for r in done for gap in r.itl]),
        "e2e_ms": ms_stats([r.latency for r in done]),
        "tokens_per_chunk": {"mean": float(np.mean(chunks)) if chunks else None,
                             "max": max(chunks, default=None)},
        "prefix_hit_rate": hit_rate, "optimum_hit_rate": optimum_hit_rate,
        "hit_rate_vs_optimum": ratio(hit_rate, optimum_hit_rate) if hit_rate is not None else None,
        "server_hit_rate": server_hit_rate, "server_compiles": compiles,
        "server_host_fraction": timing["host_fraction"],
        "server_host_ms_per_step": timing["host_ms_per_step"],
        "server_ms_per_step": timing["ms_per_step"],
        # The same while every request of a full batch decodes (SteadyWindow).
        "steady_host_fraction": full["host_fraction"],
        "steady_host_ms_per_step": full["host_ms_per_step"],
        "steady_ms_per_step": full["ms_per_step"], "steady_steps": full["steps"],
    }


async def run_benchmark(args) -> dict:
    """Runs the warmup, then the timed load; returns {args, model, dataset, metrics}.
    Raises SystemExit when the model cannot be listed or a warmup request fails."""
    requests = make_dataset(args)
    dataset = summarize_dataset(requests, args)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # trust_env=False: no proxy from the environment between the client and the server.
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
        model = args.model
        if model is None:
            try:
                r = (await client.get(f"{args.base_url}/v1/models")).raise_for_status()
                model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                raise SystemExit(f"cannot list {args.base_url}/v1/models ({e}): "
                                 "pass --model") from e
        # Warmup prompts are fresh random tokens, so they seed no prefix the timed run reuses.
        rng = np.random.default_rng([args.seed, 2])
        warm = [Request(random_tokens(rng, len(r.prompt), args.vocab_size), min(r.output_len, 8))
                for r in requests[:args.warmup_requests]]
        for res in await asyncio.gather(*(send(client, model, r, args) for r in warm)):
            if not res.ok:
                raise SystemExit(f"warmup request failed: {res.error}")
        before = await scrape_counters(client, args.base_url)
        window = SteadyWindow(client, args.base_url,
                              min(args.max_concurrency or len(requests), len(requests)))
        results, duration = await run_load(client, model, requests, args, window)
        after = await scrape_counters(client, args.base_url)
        steady = await window.counters()
    metrics = compute_metrics(results, requests, duration, dataset["optimum_hit_rate"],
                              (before, after), steady)
    plain_args = {k: ("inf" if v == math.inf else v) for k, v in vars(args).items()}
    return {"args": plain_args, "model": model, "dataset": dataset, "metrics": metrics}


def print_report(report: dict) -> None:
    a, d, m = report["args"], report["dataset"], report["metrics"]

    def num(x, fmt=".3f"):
        return "n/a" if x is None else format(x, fmt)
    print(f"\n{a['base_url']}  model {report['model']}  {d['name']}, {d['num_requests']} requests"
          f"  rate {a['request_rate']}/s  max concurrency {a['max_concurrency'] or 'none'}")
    rows = [
        ("completed / failed", f"{m['completed']} / {m['failed']}", ""),
        ("duration", f"{m['duration_s']:.2f} s", "first send to last stream end"),
        ("request throughput", f"{m['request_throughput']:.2f} req/s", "completed / duration"),
        ("input throughput", f"{m['input_throughput']:.1f} tok/s", "prompt tokens / duration"),
        ("output throughput", f"{m['output_throughput']:.1f} tok/s", "output tokens / duration"),
        ("mean concurrency", f"{m['mean_concurrency']:.1f}", "sum of e2e latencies / duration"),
        ("prefix hit rate", num(m["prefix_hit_rate"]), "cached / prompt tokens, from usage"),
        ("optimum hit rate", num(m["optimum_hit_rate"]),
         f"ideal cache of {d['page_size']}-token pages, same order"),
        ("achieved / optimum", num(m["hit_rate_vs_optimum"]), ""),
        ("server hit rate", num(m["server_hit_rate"]), "from /metrics counters, over the run"),
        ("server compiles", num(m["server_compiles"], "d"), "XLA compilations during the run"),
        ("engine ms / step", num(m["server_ms_per_step"]), "engine wall time / model steps"),
        ("host ms / step", num(m["server_host_ms_per_step"]),
         "engine time not spent waiting on the device, per model step"),
        ("host fraction", num(m["server_host_fraction"]), "host ms / engine ms"),
        ("steady host frac.", num(m["steady_host_fraction"]),
         f"the same over {num(m['steady_steps'], '.0f')} steps of a full batch, all decoding"),
        ("tokens per chunk", f"{num(m['tokens_per_chunk']['mean'], '.2f')} mean, "
         f"{m['tokens_per_chunk']['max']} max", "decode steps per streamed chunk"),
    ]
    for name, value, meaning in rows:
        print(f"  {name:<20} {value:>18}   {meaning}")
    print(f"  {'latency (ms)':<20} {'mean':>8} {'p50':>8} {'p99':>8}")
    for key, meaning in [("ttft_ms", "send to first token-bearing chunk"),
                         ("tpot_ms", "(e2e - TTFT) / (output tokens - 1), per request"),
                         ("itl_ms", "gap between token-bearing chunks, once per chunk"),
                         ("e2e_ms", "send to end of stream")]:
        s = m[key]
        print(f"  {key[:-3].upper():<20} {num(s['mean'], '8.1f')} {num(s['p50'], '8.1f')} "
              f"{num(s['p99'], '8.1f')}   {meaning}")
    for error in m["errors"]:
        print(f"  error: {error}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root")
    p.add_argument("--model", default=None, help="default: the first id of /v1/models")
    p.add_argument("--dataset", default="random",
                   choices=["random", "sharegpt-like", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=None,
                   help="default 200; generated-shared-prefix: groups x prompts per group")
    p.add_argument("--seed", type=int, default=0, help="prompts, lengths and arrival gaps")
    p.add_argument("--vocab-size", type=int, default=256, help="token ids in [4, vocab)")
    p.add_argument("--random-input-len", type=int, default=1024, help="random: prompt tokens")
    p.add_argument("--random-output-len", type=int, default=128, help="random: max_tokens")
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="lengths uniform in [ratio * len, len]")
    p.add_argument("--max-input-len", type=int, default=1024, help="sharegpt-like clip")
    p.add_argument("--max-output-len", type=int, default=512, help="sharegpt-like clip")
    for name, default in [("num-groups", 16), ("prompts-per-group", 16),
                          ("system-prompt-len", 1024), ("question-len", 128), ("output-len", 128)]:
        p.add_argument(f"--gsp-{name}", type=int, default=default, help="generated-shared-prefix")
    p.add_argument("--page-size", type=int, default=16, help="server's KV page, for the optimum")
    p.add_argument("--logprobs", type=int, default=None,
                   help="ask for each token's log probability and this many most likely")
    p.add_argument("--fields", type=json.loads, default={},
                   help='more request fields, as JSON: \'{"presence_penalty": 0.5}\'')
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    p.add_argument("--warmup-requests", type=int, default=1,
                   help="untimed, on fresh random prompts of the first requests' lengths")
    p.add_argument("--timeout", type=float, default=600, help="seconds, per read")
    p.add_argument("--output-file", default=None,
                   help="default: bench/results/serving-<dataset>.json")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    if args.vocab_size <= FIRST_TOKEN_ID:
        p.error(f"--vocab-size must exceed {FIRST_TOKEN_ID}")
    if args.dataset == "generated-shared-prefix" and args.num_prompts is not None:
        p.error("generated-shared-prefix sends gsp-num-groups x gsp-prompts-per-group prompts: "
                "leave out --num-prompts")
    args.base_url = args.base_url.rstrip("/")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = asyncio.run(run_benchmark(args))
    report["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["command"] = " ".join(["python bench/serving.py", *(sys.argv[1:] if argv is None
                                                              else argv)])
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True, cwd=Path(__file__).parent).stdout.strip()
    print_report(report)
    out = Path(args.output_file or Path(__file__).parent / "results" /
               f"serving-{args.dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"  wrote {out}")
    return report


if __name__ == "__main__":
    main()
