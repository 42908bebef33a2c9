"""The on-device sampler's parts on the GPU: checks each against a plain reference, then times
it, in one run.

    python bench/sampler.py [--vocab 128256] [--batches 1 8 64] [--out bench/results/sampler.json]

float32 logits [B, vocab] (Llama 3's vocabulary by default). Cases: engine.sampling.sample at
each level (PLAIN; ADJUSTED, as it runs for log probabilities; FILTERED, which sorts the
vocabulary), and their parts: a sort of the vocabulary, log_softmax, lax.top_k(20) and the
chunked top-k (engine.sampling.chunked_top_k) at several chunk sizes; PyTorch's topk and sort on
the same logits for reference. A pass over the logits reads B x vocab x 4 bytes: the "read" column is
that over the time, for comparison with the device's copy rate.
"""

import argparse
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kernels import time_jax, time_torch  # noqa: E402
from engine import limits  # noqa: E402
from engine.sampling import ADJUSTED, FILTERED, PLAIN, chunked_top_k, sample  # noqa: E402

K = limits.MAX_LOGPROBS


def cases(batch: int, vocab: int) -> list[dict]:
    logits = jax.random.normal(jax.random.key(batch), (batch, vocab), jnp.float32) * 4
    ones, zeros = jnp.ones(batch, jnp.float32), jnp.zeros(batch, jnp.int32)
    seed = jnp.arange(batch, dtype=jnp.uint32)
    want_v, want_i = jax.lax.top_k(logits, K)
    rows = []

    def add(name, fn, check=None):
        out = jax.block_until_ready(fn(logits))
        ok = bool(check(out)) if check is not None else None
        sec = time_jax(fn, logits)
        rows.append({"batch": batch, "case": name, "us": round(sec * 1e6, 1), "ok": ok,
                     "read_GBps": round(batch * vocab * 4 / sec / 1e9, 1)})
        print(rows[-1], flush=True)

    def sampler(level):
        return jax.jit(lambda x: sample(x, ones, zeros, ones, seed, zeros, level=level))

    greedy = jnp.argmax(logits, -1)
    add("sample PLAIN (temperature 1)", sampler(PLAIN), lambda s: s.tokens.shape == (batch,))
    for name, level in ("ADJUSTED", ADJUSTED), ("FILTERED", FILTERED):
        add(f"sample {name} (temperature 1, logprobs)", sampler(level),
            lambda s: (s.top_ids == want_i).all())
    add("jnp.sort", jax.jit(lambda x: jnp.sort(x, axis=-1)),
        lambda s: (s[:, -1] == want_v[:, 0]).all())
    add("argmax", jax.jit(lambda x: jnp.argmax(x, -1)), lambda a: (a == greedy).all())
    add("log_softmax", jax.jit(jax.nn.log_softmax),
        lambda lp: np.allclose(np.exp(np.asarray(lp)).sum(-1), 1, atol=1e-3))
    add(f"lax.top_k({K})", jax.jit(lambda x: jax.lax.top_k(x, K)),
        lambda r: (r[1] == want_i).all())
    add("lax.top_k(16)", jax.jit(lambda x: jax.lax.top_k(x, 16)),
        lambda r: (r[1] == want_i[:, :16]).all())
    for chunk in (64, 128, 512):
        add(f"chunked top_k({K}), chunk {chunk}",
            jax.jit(functools.partial(chunked_top_k, k=K, chunk=chunk)),
            lambda r: (r[1] == want_i).all() and (r[0] == want_v).all())
    try:
        import torch
    except ImportError:
        return rows
    t = torch.from_numpy(np.asarray(logits)).cuda()
    for name, fn in [(f"torch.topk({K})", lambda: torch.topk(t, K, dim=-1)),
                     ("torch.sort", lambda: torch.sort(t, dim=-1))]:
        sec = time_torch(fn)
        rows.append({"batch": batch, "case": name, "us": round(sec * 1e6, 1), "ok": None,
                     "read_GBps": round(batch * vocab * 4 / sec / 1e9, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--out", default="bench/results/sampler.json")
    a = p.parse_args()
    rows = [r for b in a.batches for r in cases(b, a.vocab)]
    bad = [r for r in rows if r["ok"] is False]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    Path(a.out).write_text(json.dumps({
        "device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
        "commit": commit, "vocab": a.vocab, "rows": rows}, indent=1) + "\n")
    if bad:
        sys.exit(f"wrong results: {bad}")


if __name__ == "__main__":
    main()
