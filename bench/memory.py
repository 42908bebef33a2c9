"""Device memory per KV layout and pool sizing, on one seeded mixed-length workload.

    python bench/memory.py --out bench/results/memory.json          # on the GPU machine
    python bench/memory.py --plot bench/results/memory.json         # the PNG beside it

Layouts static / paged / hybrid x pools static / elastic, each in a fresh process: the
allocator's peak cannot be reset, and an elastic pool needs its allocator chosen before JAX
starts (cuda_async without preallocation, so freed memory goes back to the driver; a static
pool keeps XLA's default). Every configuration has the same KV budget (`--budget-tokens`: the
static pool's size, the elastic pool's ceiling). In each process:

- start-up: the engine built (weights + the pool, or its smallest size), nothing run;
- burst 1, then `--idle` seconds idle (the engine thread's idle loop: `Engine.maintain`), then
  burst 2 and idle again. For an elastic pool burst 1 is the warm-up (it compiles the steps for
  every pool size it meets) and burst 2 is the measured one.

The workload (`workload`): chat requests (max_tokens 1024 by default, most stop far earlier;
`--chat-max-tokens 0`: unset, as from a client that omits it, so the rest of the context), short
completions (max_tokens 64, run to it) and long documents (8-24k prompt tokens), all arriving at
once. A request that "stops" before max_tokens is ended by the driver at its drawn length, as an
EOS token would end it (the random weights never choose to stop), and frees its pages the same
way.

Memory is read four ways: live arrays and the allocator's peak (`memory_stats()`), the
allocator's pool where it reports one, and the driver's per-process figure (NVML), sampled
every 50 ms on a thread. Also recorded: requests held at once (running),
KV waste (reserved but empty slots over reserved bytes, per layout), and the wall time of the
steps in which the pool grew against the other steps.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "llama-3.2-1b-random"
CONFIGS = [(layout, pool) for pool in ("static", "elastic")
           for layout in ("static", "paged", "hybrid")]


@dataclasses.dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    stop_at: int          # output length at which the request ends (an EOS, emulated)


def workload(seed: int, n: int, context: int, vocab: int, chat_max_tokens: int = 1024
             ) -> list[Job]:
    """n requests: 70% chat (prompt ~300 tokens, max_tokens `chat_max_tokens`, 0 for the rest
    of the context; output ~150 lognormal, at most 1024), 20% short completions (prompt ~100,
    64 tokens), 10% long documents (a quarter to three quarters of the context, max_tokens 512,
    output ~200). Lengths are cut to fit `context`. The draws do not depend on
    chat_max_tokens."""
    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(n):
        kind = rng.choice(3, p=[0.7, 0.2, 0.1])
        if kind == 0:
            prompt = int(np.clip(rng.lognormal(np.log(300), 0.8), 16, context // 8))
            cap, out = chat_max_tokens or context, int(np.clip(rng.lognormal(np.log(150), 0.8),
                                                               8, 1024))
        elif kind == 1:
            prompt, cap = int(np.clip(rng.lognormal(np.log(100), 0.5), 8, context // 8)), 64
            out = cap
        else:
            prompt, cap = int(rng.integers(context // 4, 3 * context // 4)), 512
            out = int(np.clip(rng.lognormal(np.log(200), 0.6), 8, 512))
        cap = min(cap, context - prompt)
        jobs.append(Job(rng.integers(3, vocab, prompt).tolist(), cap, min(out, cap)))
    return jobs


class Sampler:
    """Memory every `period` seconds on a thread: (t, live bytes, driver MiB, pool pages,
    running requests)."""

    def __init__(self, device, engine, period=0.05):
        self.device, self.engine, self.period = device, engine, period
        self.rows: list[tuple] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._nvml = _nvml_handle()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def driver_mib(self) -> float | None:
        """This process's memory as the driver counts it (None without an NVIDIA driver)."""
        if self._nvml is None:
            return None
        import pynvml
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml):
            if p.pid == os.getpid():
                return p.usedGpuMemory / 2**20
        return None

    def sample(self) -> tuple:
        stats = self.device.memory_stats() or {}
        sched = self.engine.scheduler
        return (time.monotonic() - self.t0, stats.get("bytes_in_use"), self.driver_mib(),
                sched.pool.capacity, len(sched.running))

    def _run(self):
        while not self._stop.is_set():
            self.rows.append(self.sample())
            time.sleep(self.period)

    def stop(self):
        self._stop.set()
        self._thread.join()


def _nvml_handle():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except pynvml.NVMLError:    # no NVIDIA driver (a CPU run)
        return None


def run_burst(engine, jobs: list[Job], tag: str) -> dict:
    """All jobs at once, stepped to the end; returns the burst's figures."""
    import kvcache
    from engine import SamplingParams
    reqs = []
    for i, job in enumerate(jobs):
        req = engine.make_request(f"{tag}-{i}", job.prompt, SamplingParams(
            max_tokens=job.max_tokens, temperature=0, ignore_eos=True))
        engine.add(req)
        reqs.append((req, job))
    live = dict(reqs)
    steps, grew, most, waste = [], [], 0, {"static": [], "paged": []}
    start = time.monotonic()
    while engine.has_work():
        grows = engine.scheduler.pool.sizes.counts["grows"]
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
        grew.append(engine.scheduler.pool.sizes.counts["grows"] > grows)
        for req in [r for r, job in live.items() if len(r.output) >= job.stop_at]:
            del live[req]
            if req.finish_reason is None:
                engine.abort(req.rid)               # its EOS: pages go back as on a stop
        most = max(most, len(engine.scheduler.running))
        if len(steps) % 25 == 0:
            engine.sync()
            report = kvcache.usage(engine.cache)
            for layout in waste:
                if report[layout]["reserved_pages"]:
                    waste[layout].append(report[layout]["waste_tokens"]
                                         / (report[layout]["reserved_pages"] * engine.spec.page_size))
    normal = [s for s, g in zip(steps, grew) if not g]
    growth = [s for s, g in zip(steps, grew) if g]
    return {"seconds": time.monotonic() - start, "steps": len(steps),
            "max_running": most,
            "output_tokens": sum(len(r.output) for r, _ in reqs),
            "preemptions": engine.stats()["preemptions"],
            "waste_ratio": {k: float(np.mean(v)) if v else None for k, v in waste.items()},
            "step_median_s": statistics.median(normal) if normal else None,
            "step_p99_s": float(np.percentile(normal, 99)) if normal else None,
            "growth_steps_s": growth}


def idle(engine, seconds: float) -> None:
    """The server's idle loop: Engine.maintain until `seconds` have passed."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        wait = engine.maintain()
        time.sleep(min(wait if wait is not None else 0.5, end - now, 0.5))


def one_config(args, layout: str, pool: str) -> dict:
    import kvcache
    if pool == "elastic":
        kvcache.elastic.use_returning_allocator()
    import jax

    from engine import Engine, EngineConfig
    from engine.engine import use_compilation_cache
    if args.compilation_cache_dir:     # shared by the configurations' processes
        use_compilation_cache(args.compilation_cache_dir)
    engine = Engine(EngineConfig(
        model=args.model, layout=layout, static_max_tokens=args.static_max_tokens,
        kv_pool=pool, kv_pool_min_tokens=args.min_tokens, kv_pool_growth=args.growth,
        kv_shrink_after=args.shrink_after, max_total_tokens=args.budget_tokens,
        context_length=args.context, max_running_requests=args.rows,
        chunked_prefill_size=args.chunk, num_continuous_decode_steps=8))
    device = jax.devices()[0]
    sampler = Sampler(device, engine)
    weights = kvcache.nbytes(engine.params)
    stats = device.memory_stats() or {}
    startup = {"live_bytes": stats.get("bytes_in_use"),
               "pool_bytes": stats.get("pool_bytes", stats.get("bytes_reserved")),
               "driver_mib": sampler.driver_mib(),
               "kv_pool_bytes": engine.cache.num_pages * engine.spec.bytes_per_page,
               "memory_stats": stats}
    jobs = workload(args.seed, args.requests, args.context, engine.model_config.vocab_size,
                    args.chat_max_tokens)
    bursts, after = [], []
    for b in range(2):
        begin = time.monotonic() - sampler.t0
        bursts.append(run_burst(engine, jobs, f"b{b}"))
        end = time.monotonic() - sampler.t0
        bursts[-1] |= {"t_start": begin, "t_end": end}
        idle(engine, args.idle)
        s = sampler.sample()
        after.append({"seconds_after": s[0] - end, "live_bytes": s[1], "driver_mib": s[2],
                      "pool_pages": s[3]})
    sampler.stop()
    rows = sampler.rows
    keep = np.linspace(0, len(rows) - 1, min(len(rows), 300)).astype(int)
    peak = device.memory_stats() or {}
    return {"layout": layout, "pool": pool, "device": device.device_kind,
            "weights_bytes": weights, "startup": startup,
            "peak_live_bytes": peak.get("peak_bytes_in_use"),
            "peak_driver_mib": max((r[2] for r in rows if r[2] is not None), default=None),
            "bursts": bursts, "after_idle": after, "pool_report": engine.scheduler.pool.report(),
            "series": [rows[i] for i in keep]}


def targets(results: list[dict]) -> dict:
    """Issue 5's targets from the runs."""
    by = {(r["layout"], r["pool"]): r for r in results}
    out = {}
    for (layout, pool), r in by.items():
        if pool != "elastic":
            continue
        w = r["weights_bytes"]
        over = [x / w - 1 if x is not None else None
                for x in (r["startup"]["live_bytes"], *(a["live_bytes"] for a in r["after_idle"]))]
        out[f"{layout}/elastic"] = {
            "startup_live_over_weights": over[0],
            "after_idle_live_over_weights": over[1:],
            "weights_mib": w / 2**20,
            "driver_mib_startup_then_after_idle": [
                r["startup"]["driver_mib"], *(a["driver_mib"] for a in r["after_idle"])],
            "growth_steps_measured": len(r["bursts"][1]["growth_steps_s"]),
            "growth_p99_minus_median_ms": (
                1e3 * (np.percentile(r["bursts"][1]["growth_steps_s"], 99)
                       - r["bursts"][1]["step_median_s"])
                if r["bursts"][1]["growth_steps_s"] else None)}
    if ("hybrid", "static") in by and ("static", "static") in by:
        h, s = by["hybrid", "static"]["bursts"][1], by["static", "static"]["bursts"][1]
        out["held_at_once_hybrid_over_static"] = h["max_running"] / s["max_running"]
        out["paged_waste_ratio_hybrid"] = h["waste_ratio"]["paged"]
    return out


def plot(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads(path.read_text())
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for r in data["results"]:
        t = [x[0] for x in r["series"]]
        label = f"{r['layout']} layout, {r['pool']} pool"
        style = "-" if r["pool"] == "elastic" else "--"
        axes[0].plot(t, [(x[2] or 0) / 1024 for x in r["series"]], style, label=label)
        axes[1].plot(t, [(x[1] or 0) / 2**30 for x in r["series"]], style, label=label)
    w = data["results"][0]["weights_bytes"] / 2**30
    for ax, what in zip(axes, ("driver per-process (GiB)", "live arrays (GiB)")):
        ax.axhline(w, color="grey", lw=0.8)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[1].annotate("weights", (0, w), color="grey")
    axes[0].legend(fontsize=8, ncol=2)
    axes[1].set_xlabel("seconds since start-up (two bursts, each followed by an idle period)")
    fig.suptitle(f"{data['args']['model']}: KV budget {data['args']['budget_tokens']} tokens, "
                 f"{data['device']}")
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    p.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--budget-tokens", type=int, default=32768)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--rows", type=int, default=128, help="max running requests")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--static-max-tokens", type=int, default=1024)
    p.add_argument("--chat-max-tokens", type=int, default=1024,
                   help="what chat requests ask for; 0: unset (the rest of the context)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--min-tokens", type=int, default=2048)
    p.add_argument("--growth", type=int, default=4)
    p.add_argument("--shrink-after", type=float, default=5.0)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(f"{a}/{b}" for a, b in CONFIGS))
    p.add_argument("--compilation-cache-dir", type=Path,
                   help="JAX's persistent compilation cache, so later configurations reuse the "
                        "step shapes the first one compiled")
    p.add_argument("--one", help=argparse.SUPPRESS)   # layout/pool, in a subprocess
    args = p.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if args.one:
        layout, pool = args.one.split("/")
        print(json.dumps(one_config(args, layout, pool)))
        return
    results = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", config]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{config} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(config, json.dumps({"startup_live": r["startup"]["live_bytes"],
                                  "peak_live": r["peak_live_bytes"],
                                  "after_idle": r["after_idle"][-1],
                                  "held_at_once": r["bursts"][1]["max_running"]}), flush=True)
        out = {"device": results[0]["device"], "date": datetime.date.today().isoformat(),
               "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]]),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "targets": targets(results), "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))      # after every configuration
    print(json.dumps(out["targets"], indent=1))


if __name__ == "__main__":
    main()
