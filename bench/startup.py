"""Start-up as a user meets it (issue 25), per model:

    python bench/startup.py [--models llama-3.2-1b-random llama-3-8b-random]
                            [--max-running-requests 64] [--context-length 8192]

1. cold: `serve.py` with an empty compilation cache, from process launch to /health 200 (the
   programs compiled by then, and queued for the background), then the first token of one
   streamed request (and the compiles it waited for); with --wait-compiled, also until every
   program has compiled;
2. warm: the same server started again over the cache the cold one filled;
3. offline: `LLM(model, ...)` in a fresh process with an empty cache: the first `generate` of
   `--prompts` x `--output-tokens` (random ids, greedy, ignore_eos) and a second, identical one
   (the steady state).
Writes bench/results/startup.json (device, date, commit, command, a row per model).
"""

import argparse
import datetime
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent

OFFLINE = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from engine import LLM, SamplingParams
model, rows, context, prompts, prompt_len, out_len = sys.argv[1:7]
llm = LLM(model, max_running_requests=int(rows), context_length=int(context))
t1 = time.perf_counter()
high = min(32000, llm.engine.model_config.vocab_size)
ids = np.random.default_rng(0).integers(3, high, (int(prompts), int(prompt_len))).tolist()
params = SamplingParams(max_tokens=int(out_len), temperature=0, ignore_eos=True)
times = []
for _ in range(2):
    start = time.perf_counter()
    outs = llm.generate(ids, params)
    times.append(time.perf_counter() - start)
    assert all(len(o.token_ids) == int(out_len) for o in outs)
print(json.dumps({"import_and_init_s": t1 - t0, "first_generate_s": times[0],
                  "second_generate_s": times[1]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def serve_once(model: str, flags: list[str], cache: Path, log: Path, timeout: float,
               wait_compiled: bool = False) -> dict:
    """Launches serve.py, times it to /health 200 and to the first token of one request (and
    with wait_compiled, until its compile thread is done)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", model, "--port", str(port),
                             "--compilation-cache-dir", str(cache), "--log-level", "warning",
                             *flags], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve.py exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"serve.py was not ready in {timeout} s")
            time.sleep(0.1)
        ready = time.perf_counter() - start
        at_ready = {"programs_compiled": metric(url, "hybridkv_compiled_step_shapes"),
                    "programs_pending": metric(url, "hybridkv_step_shapes_pending")}
        waited = metric(url, "hybridkv_request_path_compiles_total")
        sent = time.perf_counter()
        body = {"model": model, "prompt": list(range(3, 131)), "max_tokens": 16,
                "temperature": 0, "ignore_eos": True, "stream": True}
        first = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - sent
        row = {"ready_s": ready, "first_token_s": first, "at_ready": at_ready,
               "compiles_the_first_request_waited_for":
                   metric(url, "hybridkv_request_path_compiles_total") - waited}
        if wait_compiled:     # until the compile thread is done
            while metric(url, "hybridkv_step_shapes_pending") > 0:
                if time.perf_counter() - start > timeout:
                    raise SystemExit(f"programs still compiling after {timeout} s")
                time.sleep(0.5)
            row["all_compiled_s"] = time.perf_counter() - start
            row["programs_compiled"] = metric(url, "hybridkv_compiled_step_shapes")
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def offline(model: str, args) -> dict:
    """LLM in a fresh process (no persistent compilation cache): its two generates."""
    done = subprocess.run([sys.executable, "-c", OFFLINE, model, str(args.max_running_requests),
                           str(args.context_length), str(args.prompts), str(args.prompt_tokens),
                           str(args.output_tokens)], cwd=ROOT, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"offline run failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b-random", "llama-3-8b-random"])
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--context-length", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=512)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--wait-compiled", action="store_true",
                   help="cold: also time until the background compile thread is done")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--serve-flag", action="append", default=[],
                   help="one more serve.py flag (repeat), e.g. --serve-flag=--dtype=float32")
    p.add_argument("--commit", default="unknown", help="recorded where git cannot tell")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/startup.json")
    args = p.parse_args(argv)
    flags = ["--max-running-requests", str(args.max_running_requests),
             "--context-length", str(args.context_length), *args.serve_flag]
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            cache, log = Path(tmp) / "jax-cache", Path(tmp) / "serve.log"
            row = {"model": model, "max_running_requests": args.max_running_requests,
                   "context_length": args.context_length,
                   "cold": serve_once(model, flags, cache, log, args.timeout,
                                      args.wait_compiled),
                   "warm": serve_once(model, flags, cache, log, args.timeout)}
        if not args.skip_offline:
            row["offline"] = offline(model, args) | {
                "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens}
        print(json.dumps(row), flush=True)
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or args.commit
    device = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0]"
                             ".device_kind)"], capture_output=True, text=True).stdout.strip()
    result = {"device": device, "date": datetime.date.today().isoformat(), "commit": commit,
              "command": " ".join(["python", "bench/startup.py", *(argv or sys.argv[1:])]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
