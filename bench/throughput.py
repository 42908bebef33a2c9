"""Offline throughput: prompts of random token ids through the engine's own loop, no HTTP (the
analogue of vLLM's benchmark_throughput).

    python bench/throughput.py [--model llama-3.2-1b-random] [--num-prompts 768]
                               [--input-len 512] [--output-len 128] [--tree DIR]

The defaults are bench/serving_targets.py's random workload (64 running, chunks of 512, 8
decode steps a launch, greedy, no stop), all prompts queued at once, the prefix cache off (the
passes repeat the same prompts, which would otherwise hit it). A first pass over the same
prompts compiles every program the run meets (lazily: nothing compiles in the background); then
`--repeats` timed passes, each reporting seconds and output tokens a second, and checking that
every request produced its `--output-len` tokens and counting the requests whose tokens differ
from the first pass's (any: the run fails, after writing its JSON).

`--tree DIR` runs the engine of another checkout (DIR's packages first on sys.path), for
bisecting a regression across commits in one lease; older trees name the decode-steps knob
`decode_steps` and compile lazily by default, both handled here.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def engine_config(EngineConfig, **knobs):
    """EngineConfig of whichever tree is imported, from this tree's knob names."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    if "num_continuous_decode_steps" not in names:
        knobs["decode_steps"] = knobs.pop("num_continuous_decode_steps")
    if "precompile" in names:
        knobs["precompile"] = "none"
    return EngineConfig(**knobs)


def run_pass(engine, SamplingParams, prompts, output_len: int, tag: str) -> tuple[float, list]:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    reqs = [engine.make_request(f"{tag}-{i}", p, params) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for req in reqs:
        engine.add(req)
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - start
    outputs = [list(r.output) for r in reqs]
    assert all(len(o) == output_len for o in outputs), "a request stopped short"
    return seconds, outputs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b-random")
    p.add_argument("--num-prompts", type=int, default=768)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids below this")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--chunked-prefill-size", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tree", type=Path, help="run the engine of this checkout instead")
    p.add_argument("--out", type=Path, help="write the result here as JSON")
    a = p.parse_args(argv)
    sys.path.insert(0, str((a.tree or ROOT).resolve()))
    import jax

    from engine.engine import Engine, EngineConfig
    from engine.sampling import SamplingParams
    engine = Engine(engine_config(
        EngineConfig, model=a.model, max_running_requests=a.max_running_requests,
        context_length=a.context_length, chunked_prefill_size=a.chunked_prefill_size,
        num_continuous_decode_steps=a.decode_steps, disable_radix_cache=True))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, a.vocab_size, a.input_len).tolist() for _ in range(a.num_prompts)]
    warm_seconds, first = run_pass(engine, SamplingParams, prompts, a.output_len, "warm")
    passes = []
    for i in range(a.repeats):
        seconds, outputs = run_pass(engine, SamplingParams, prompts, a.output_len, f"r{i}")
        passes.append({"seconds": seconds,
                       "output_tokens_per_s": a.num_prompts * a.output_len / seconds,
                       "requests_unlike_first_pass": sum(o != f for o, f in zip(outputs, first))})
        print(json.dumps(passes[-1]), flush=True)
    result = {"device": jax.devices()[0].device_kind,
              "engine": sys.modules["engine.engine"].__file__,      # the tree that ran
              "args": {k: str(v) for k, v in vars(a).items()},
              "first_pass_seconds": warm_seconds, "passes": passes,
              "best_output_tokens_per_s": max(x["output_tokens_per_s"] for x in passes)}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    assert not any(x["requests_unlike_first_pass"] for x in passes), \
        "a timed pass gave other tokens than the first"
    return result


if __name__ == "__main__":
    main()
