"""What the API's sampling features cost in serving throughput (issue 29's targets: <= 5% for
log probabilities, top 5; <= 10% for structured output, at 64 concurrent requests), on the GPU
machine:

    python bench/api_cost.py [--model llama-3.2-1b-random] [--skip-warmup] [--rounds 2]

One server (64 running requests, 4096 context), driven by bench/serving.py with random prompts
(256 x 512 tokens in, ids below 256 so that any model takes them, 128 out, ignore_eos, 64 at
a time) in passes that differ only in the fields each request adds: none (plain), logprobs 5,
penalties (frequency 0.5, presence 0.2), response_format json_object, and a json_schema.
After a warm-up pass of each (what the server did not compile before ready compiles there),
`--rounds` rounds of one measured pass per case, alternating, so that drift hits every case
alike; a pass in which the server compiled is run again (serving_targets.measured_pass). A
guided output ends when its grammar is complete (a random model rarely completes an object in
128 tokens). Writes bench/results/api-cost.json: each case's output tokens/s per pass and its
cost against plain.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serving_targets import Server, measured_pass, warm  # noqa: E402  (bench/serving_targets.py)

RESULTS = Path(__file__).parent / "results"
SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}}
CASES = {
    "plain": [],
    "logprobs5": ["--logprobs", "5"],
    "penalties": ["--fields", json.dumps({"frequency_penalty": 0.5, "presence_penalty": 0.2})],
    "json_object": ["--fields", json.dumps({"response_format": {"type": "json_object"}})],
    "json_schema": ["--fields", json.dumps({"response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}})],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-1b-random")
    p.add_argument("--skip-warmup", action="store_true", help="serve.py --skip-warmup")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS / "api-cost.json"))
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    flags = ["--model", args.model, "--max-running-requests", "64",
             "--context-length", str(args.context_length)]
    dataset = ["--dataset", "random", "--num-prompts", str(args.prompts), "--random-input-len",
               str(args.input_len), "--random-output-len", str(args.output_len),
               "--max-concurrency", "64", "--vocab-size", "256"]
    flags += ["--skip-warmup"] * args.skip_warmup
    log = Path(args.out).with_suffix(".server.log")
    server = Server(flags, log)
    results = {c: {"reports": [], "dropped": []} for c in cases}
    try:
        for c in cases:
            warm(server.url, dataset + CASES[c], seed=1)
        for _ in range(args.rounds):
            for c in cases:
                measured_pass(server.url, dataset + CASES[c], 1, results[c])
    finally:
        server.close()
    summary = summarize(results)
    out = {"model": args.model, "flags": flags, "dataset": dataset, "cases": CASES,
           "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    return out


def summarize(results: dict) -> dict:
    """Per case: output tokens/s per kept pass and their mean, requests completed, output
    tokens, dropped passes' tokens/s, and the cost against plain (1 - mean / plain's)."""
    summary = {}
    for c in results:
        tput = [r["metrics"]["output_throughput"] for r in results[c]["reports"]]
        summary[c] = {"output_throughputs": tput, "mean": statistics.mean(tput),
                      "completed": [r["metrics"]["completed"] for r in results[c]["reports"]],
                      "output_tokens": [r["metrics"]["total_output_tokens"]
                                        for r in results[c]["reports"]],
                      "dropped_throughputs": results[c]["dropped"]}
    if "plain" in summary:
        for c in summary:
            summary[c]["cost_vs_plain"] = 1 - summary[c]["mean"] / summary["plain"]["mean"]
    return summary


if __name__ == "__main__":
    main()
