"""The serving targets of issue 4, in one run on the GPU machine: starts serve.py with and
without the radix cache and drives it with bench/serving.py.

    python bench/serving_targets.py [--model llama-3.2-1b-random] [--quick] [--skip-warmup]
                                    [--workloads shared_prefix,random,decode64]

1. shared-prefix workload: output tokens/s with the radix cache vs --disable-radix-cache, and
   the hit rate against the optimum;
2. no shared prefix (random prompts): the cost of the cache in output tokens/s (the mean of
   4 measured passes per server);
3. decode with 64 running requests: host time per model step not hidden behind the device,
   while all 64 decode (and, for reference, over the whole run with its prefill).
The two servers run side by side, each with 45% of the device's memory for XLA and 0.4 of
that for weights and pool (their KV pools are capped at what 64 full contexts need either
way), and take turns: for each workload a warm-up
pass on each (the server compiled its step shapes at start-up; what compiles lazily, such as
the page operations, compiles here), then measured passes alternating between them, each after
emptying the prefix cache, so that whatever drifts over the run (the machine, the client) hits
both alike. A measured pass in which the server compiled timed the compiler: it is run again
(up to 3 times per server and workload; the JSON lists the passes dropped). Writes
bench/results/serving-targets.json.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402  (bench/serving.py)

ROOT = Path(__file__).parent.parent
WORKLOADS = ("shared_prefix", "random", "decode64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, flags: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # XLA takes 75% of the device at start-up by default: the second server would find
        # too little. Each gets 45%, its KV pool and weights within (--mem-fraction-static).
        env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(self.port),
                                      "--log-level", "warning", *flags], cwd=ROOT, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve.py exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve.py did not start in 600 s")
            time.sleep(1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def bench(url: str, dataset_args: list[str], seed: int) -> dict:
    args = serving.parse_args(["--base-url", url, "--disable-tqdm", "--seed", str(seed),
                               "--warmup-requests", "1", "--output-file", "/dev/null",
                               *dataset_args])
    return asyncio.run(serving.run_benchmark(args))


def warm(url: str, dataset_args: list[str], seed: int) -> None:
    """A warm-up pass of the workload: it compiles what the server's start-up did not. Each
    workload has its own seed, so no workload's prompts share a prefix with another's."""
    start = time.monotonic()
    bench(url, dataset_args, seed=seed)
    print(f"warm-up pass: {time.monotonic() - start:.0f} s", flush=True)


def measured_pass(url: str, dataset_args: list[str], seed: int, result: dict,
                  retries: int = 3) -> None:
    """One measured pass after emptying the prefix cache, added to result (its "reports" and
    "dropped" lists); a pass in which the server compiled is dropped and run again, `retries`
    times at most over the result's passes."""
    while True:
        httpx.post(f"{url}/flush_cache", timeout=60).raise_for_status()
        report = bench(url, dataset_args, seed=seed)
        serving.print_report(report)
        if not report["metrics"]["server_compiles"] or len(result["dropped"]) >= retries:
            result["reports"].append(report)
            return
        print("the server compiled in this pass: dropped, run again", flush=True)
        result["dropped"].append(report["metrics"]["output_throughput"])


def summarize(result: dict) -> dict:
    """The first kept pass's report with every kept pass's output tokens/s and XLA compiles,
    and the dropped passes' output tokens/s, added."""
    reports = result["reports"]
    return reports[0] | {"output_throughputs": [r["metrics"]["output_throughput"]
                                                for r in reports],
                         "compiles_per_pass": [r["metrics"]["server_compiles"] for r in reports],
                         "dropped_throughputs": result["dropped"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b-random")
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids below this")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="small workloads, to try the script")
    p.add_argument("--skip-warmup", action="store_true",
                   help="start the servers with --skip-warmup: only the shapes the workloads "
                        "meet compile, in their warm-up passes (for a machine that compiles "
                        "slowly; the measured passes are the same)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="the workloads to run, in this order, comma-separated (a part of the "
                        "targets, for a call that cannot fit them all)")
    p.add_argument("--output-file", default=str(ROOT / "bench/results/serving-targets.json"))
    a = p.parse_args(argv)
    chosen = a.workloads.split(",")
    if not set(chosen) <= set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    scale = 4 if a.quick else 1
    vocab = ["--vocab-size", str(a.vocab_size)]
    shared = ["--dataset", "generated-shared-prefix", "--gsp-num-groups", str(16 // scale),
              "--gsp-prompts-per-group", "16", "--gsp-system-prompt-len", str(2048 // scale),
              "--gsp-question-len", "64", "--gsp-output-len", "64", "--max-concurrency", "64",
              *vocab]
    plain = ["--dataset", "random", "--num-prompts", str(768 // scale), "--random-input-len",
             "512", "--random-output-len", "128", "--max-concurrency", "64", *vocab]
    decode = ["--dataset", "random", "--num-prompts", "64", "--random-input-len", "128",
              "--random-output-len", str(512 // scale), "--max-concurrency", "64", *vocab]
    flags = ["--model", a.model, "--max-running-requests", "64",
             "--context-length", str(a.context_length), "--chunked-prefill-size", "512",
             "--mem-fraction-static", "0.4", *(["--skip-warmup"] if a.skip_warmup else [])]
    logs = Path("/tmp")
    results = {}
    servers = {}
    try:
        for name, extra in [("radix", []), ("no_radix", ["--disable-radix-cache"])]:
            start = time.monotonic()
            servers[name] = Server(flags + extra, logs / f"serve-{name}.log")
            print(f"{name} server up in {time.monotonic() - start:.0f} s", flush=True)
        # The random workload's passes differ by up to ~20% in output tokens/s on the H100 (at
        # 256 prompts, 2.5-3 s a pass): its cost compares means of 4 passes of 768 prompts.
        workloads = {"shared_prefix": (shared, 10, 1, ["radix", "no_radix"]),
                     "random": (plain, 20, 4, ["radix", "no_radix"]),
                     "decode64": (decode, 30, 1, ["radix"])}
        for workload in chosen:                   # in the order asked for
            dataset, seed, passes, names = workloads[workload]
            runs = {name: {"reports": [], "dropped": []} for name in names}
            for name in names:
                print(f"\n=== {name}: {workload}, warm-up", flush=True)
                warm(servers[name].url, dataset, seed)
            for i in range(passes):
                for name in names:
                    print(f"\n=== {name}: {workload}, pass {i + 1}", flush=True)
                    measured_pass(servers[name].url, dataset, seed, runs[name])
            for name in names:
                results[f"{name}/{workload}"] = summarize(runs[name])
            Path(a.output_file).write_text(json.dumps({"partial": True, "runs": results}))
    finally:
        for server in servers.values():
            server.close()

    def tput(key):
        return sum(results[key]["output_throughputs"]) / len(results[key]["output_throughputs"])
    summary, targets = {}, []
    if "shared_prefix" in chosen:
        summary["shared_prefix_speedup"] = (tput("radix/shared_prefix")
                                            / tput("no_radix/shared_prefix"))
        summary["shared_prefix_hit_vs_optimum"] = \
            results["radix/shared_prefix"]["metrics"]["hit_rate_vs_optimum"]
        targets += [f"speedup >= 3: {summary['shared_prefix_speedup']:.2f}",
                    f"hit/optimum >= 0.95: {summary['shared_prefix_hit_vs_optimum']:.3f}"]
    if "random" in chosen:
        summary["random_cache_cost"] = 1 - tput("radix/random") / tput("no_radix/random")
        targets.append(f"cache cost <= 1%: {summary['random_cache_cost']:.2%}")
    if "decode64" in chosen:
        d = results["radix/decode64"]["metrics"]
        summary |= {
            # The target's measure: while all 64 requests decode (bench/serving.py
            # SteadyWindow).
            "decode64_host_fraction": d["steady_host_fraction"],
            "decode64_host_ms_per_step": d["steady_host_ms_per_step"],
            "decode64_ms_per_step": d["steady_ms_per_step"],
            # Over the whole run, the prefill of the 64 prompts and the ends included.
            "decode64_run_host_fraction": d["server_host_fraction"]}
        targets.append(f"host <= 5% of the step at 64 running: "
                       f"{summary['decode64_host_fraction']:.1%}")
    # Compiles in measured passes time the compiler, not the server: 0 for a valid run.
    summary["compiles_in_measured_passes"] = sum(n or 0 for r in results.values()
                                                 for n in r["compiles_per_pass"])
    print("\n" + json.dumps(summary, indent=1))
    print("targets: " + "; ".join(targets))
    if summary["compiles_in_measured_passes"]:
        print(f"NOT VALID: the server compiled {summary['compiles_in_measured_passes']} times in "
              "measured passes; per workload: " + ", ".join(
                  f"{k} {r['compiles_per_pass']}" for k, r in results.items()))
    out = {"model": a.model, "flags": flags, "quick": a.quick, "summary": summary,
           "runs": results}
    Path(a.output_file).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
