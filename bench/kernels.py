"""Paged-attention kernels on the GPU: checks each result, then times it, in one run.

    python bench/kernels.py --out bench/results/kernels.json

Decode (32 query heads, 8 KV heads, head_dim 128, bf16, page 16, pages scattered at random): our
kernel, the same with Gemma 2's logit soft-cap, our kernel over a contiguous page table (the
static layout), JAX's own Pallas paged kernel on the same pages, PyTorch SDPA on the same KV
laid out contiguously, and a plain device copy of as many bytes. Decode speed is KV bytes read
per second; the copy counts bytes read + written. Prefill (causal, 8192 tokens, 32 heads,
head_dim 128, fp16): our paged kernels (Mosaic GPU, kernels/mgpu.py, the one
kernels.paged_attention picks on Hopper; and the Triton one, kernels/gpu.py) against PyTorch
SDPA and JAX's Mosaic GPU attention on contiguous inputs, in FLOP/s. Mixed (`--cases mixed`):
decode batches whose rows differ in length by up to 500x, and two of one length, at head_dim
64 and 128, through the dispatch and through the Triton kernel with one work item a row,
against SDPA and a copy of the same bytes (mixed_case). FP8 (`--cases fp8`): the
engine's dispatch on bf16 pages against the same values in float8_e4m3fn pages, decode and
prefill (fp8_case). MoE (`--cases moe`): the experts' grouped product at Qwen3-30B-A3B's shapes,
kernels.grouped_matmul against XLA's own jax.lax.ragged_dot (moe_case).
"""

import argparse
import datetime
import functools
import itertools
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import worklist  # noqa: E402
from kernels.gpu import paged_attention_gpu  # noqa: E402
from kernels.mgpu import paged_decode_mgpu, paged_prefill_mgpu  # noqa: E402
from kernels.reference import paged_attention_reference  # noqa: E402

N_HEADS, K_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
SOFTCAP = 50.0      # Gemma 2's attn_logit_softcapping


def time_jax(fn, *args, iters=20, repeats=7) -> float:
    """Median seconds per call (calls queued back to back, synced once per repeat)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def time_torch(fn, iters=20, repeats=7) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_torch(x):
    import torch
    return torch.from_dlpack(x)


def sweep_ours(sweep, args, reference, work, rate_key, err_key, iters=20,
               kernel=paged_attention_gpu):
    """Checks and times our kernel under every config of the sweep -> (rows, fastest row);
    rate_key gets work (bytes or FLOPs) per second, in units of 1e12."""
    rows = []
    for cfg in sweep:
        fn = functools.partial(kernel, **cfg)
        err = rel_err(fn(*args), reference)
        seconds = time_jax(fn, *args, iters=iters)
        rows.append({**cfg, "seconds": seconds, rate_key: work / seconds / 1e12, err_key: err})
    return rows, min(rows, key=lambda row: row["seconds"])


def decode_case(batch: int, seq: int, sweep: list[dict], triton_sweep: list[dict],
                rng: np.random.Generator) -> dict:
    import torch
    import torch.nn.functional as F
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    pages_per_seq = seq // PAGE
    num_pages = batch * pages_per_seq + 1                       # + the trash page
    key = jax.random.key(int(rng.integers(2**31)))
    kq, kk, kv = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (num_pages, PAGE, K_HEADS, HEAD_DIM), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (num_pages, PAGE, K_HEADS, HEAD_DIM), jnp.bfloat16)
    q = jax.random.normal(kq, (batch, 1, N_HEADS, HEAD_DIM), jnp.bfloat16)
    scattered = jnp.asarray(1 + rng.permutation(num_pages - 1).reshape(batch, pages_per_seq),
                            jnp.int32)
    contiguous = jnp.arange(1, num_pages, dtype=jnp.int32).reshape(batch, pages_per_seq)
    lengths = jnp.full((batch,), seq, jnp.int32)
    positions = jnp.full((batch, 1), seq - 1, jnp.int32)
    kv_bytes = 2 * batch * seq * K_HEADS * HEAD_DIM * 2

    reference = jax.jit(paged_attention_reference)(q, k_pages, v_pages, scattered, positions,
                                                   lengths)
    args = (q, k_pages, v_pages, scattered, positions, lengths)
    result = {"batch": batch, "seq": seq, "kv_bytes": kv_bytes}
    result["ours"], best = sweep_ours(sweep, args, reference, kv_bytes, "tb_s", "rel_err",
                                      kernel=paged_decode_mgpu)
    result["best"] = best
    fn = functools.partial(paged_decode_mgpu, **{k: best[k] for k in sweep[0]})
    out_s = fn(*args)
    out_c = fn(q, k_pages, v_pages, contiguous, positions, lengths)
    seconds = time_jax(fn, q, k_pages, v_pages, contiguous, positions, lengths)
    result["ours_contiguous_table"] = {"seconds": seconds, "tb_s": kv_bytes / seconds / 1e12}
    # The default configuration with Gemma 2's logit soft-cap (50): what the tanh costs.
    capped = functools.partial(paged_decode_mgpu, logit_softcap=SOFTCAP)
    want = jax.jit(functools.partial(paged_attention_reference, logit_softcap=SOFTCAP))(*args)
    seconds = time_jax(capped, *args)
    result["ours_softcap"] = {"logit_softcap": SOFTCAP, "seconds": seconds,
                              "tb_s": kv_bytes / seconds / 1e12,
                              "rel_err": rel_err(capped(*args), want)}
    result["ours_triton"], result["best_triton"] = sweep_ours(triton_sweep, args, reference,
                                                              kv_bytes, "tb_s", "rel_err")

    # JAX's own paged kernel wants [K,P,G,H] pages.
    kh, vh = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
    splits = 16 if pages_per_seq % 16 == 0 else 1
    # JAX's paged kernel does not scale the logits by 1/sqrt(head_dim): fold it into q.
    jfn = jax.jit(lambda q, k, v, t, n: jax_paged.paged_attention(
        q * jnp.bfloat16(HEAD_DIM ** -0.5), k, v, t, n, k_splits=splits))
    out_j = jfn(q[:, 0], kh, vh, scattered, lengths)
    seconds = time_jax(jfn, q[:, 0], kh, vh, scattered, lengths)
    result["jax_paged"] = {"seconds": seconds, "tb_s": kv_bytes / seconds / 1e12,
                           "rel_err_vs_ours": rel_err(out_j, out_s[:, 0])}

    # PyTorch SDPA on the same K/V, contiguous: [B,K,S,H].
    def dense(pages):
        return jnp.transpose(pages[contiguous].reshape(batch, seq, K_HEADS, HEAD_DIM),
                             (0, 2, 1, 3))
    tk, tv = to_torch(dense(k_pages)), to_torch(dense(v_pages))
    tq = to_torch(jnp.transpose(q, (0, 2, 1, 3)))
    with torch.no_grad():
        out_t = F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
        seconds = time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv,
                                                                    enable_gqa=True))
    result["torch_sdpa"] = {"seconds": seconds, "tb_s": kv_bytes / seconds / 1e12,
                            "rel_err_vs_ours": rel_err(out_t.float().cpu().numpy()[:, :, 0],
                                                       out_c[:, 0])}

    flat = jnp.concatenate([k_pages.reshape(-1), v_pages.reshape(-1)])[:kv_bytes // 2]
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    seconds = time_jax(copy, flat)
    result["device_copy"] = {"seconds": seconds, "tb_s_read_write": 2 * kv_bytes / seconds / 1e12}
    return result


def prefill_case(tokens: int, sweep: list[dict], mosaic_sweep: list[dict],
                 rng: np.random.Generator) -> dict:
    import torch
    import torch.nn.functional as F
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    heads = 32
    key = jax.random.key(int(rng.integers(2**31)))
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, tokens, heads, HEAD_DIM), jnp.float16)
    k = jax.random.normal(kk, (1, tokens, heads, HEAD_DIM), jnp.float16)
    v = jax.random.normal(kv, (1, tokens, heads, HEAD_DIM), jnp.float16)
    num_pages = tokens // PAGE + 1
    order = jnp.asarray(1 + rng.permutation(num_pages - 1), jnp.int32)
    k_pages = jnp.zeros((num_pages, PAGE, heads, HEAD_DIM), jnp.float16).at[order].set(
        k[0].reshape(-1, PAGE, heads, HEAD_DIM))
    v_pages = jnp.zeros((num_pages, PAGE, heads, HEAD_DIM), jnp.float16).at[order].set(
        v[0].reshape(-1, PAGE, heads, HEAD_DIM))
    table = order[None]
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]
    lengths = jnp.array([tokens], jnp.int32)
    flops = 4 * tokens * tokens * HEAD_DIM * heads // 2

    tq, tk, tv = (to_torch(jnp.transpose(x, (0, 2, 1, 3))) for x in (q, k, v))
    with torch.no_grad():
        out_t = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        t_seconds = time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv,
                                                                      is_causal=True))
    reference = np.asarray(out_t.float().cpu().numpy()).transpose(0, 2, 1, 3)
    result = {"tokens": tokens, "heads": heads, "flops": flops,
              "torch_sdpa": {"seconds": t_seconds, "tflop_s": flops / t_seconds / 1e12}}
    paged = (q, k_pages, v_pages, table, positions, lengths)
    result["ours"], result["best"] = sweep_ours(sweep, paged, reference, flops, "tflop_s",
                                                "rel_err_vs_torch", iters=5)
    result["ours_mosaic"], result["best_mosaic"] = sweep_ours(
        mosaic_sweep, paged, reference, flops, "tflop_s", "rel_err_vs_torch", iters=5,
        kernel=paged_prefill_mgpu)
    try:
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                             causal=True)
        # attention_mgpu computes softmax(q k^T) with no 1/sqrt(head_dim): fold it into q.
        mfn = jax.jit(lambda q, k, v: attention_mgpu.attention(
            q * jnp.float16(HEAD_DIM ** -0.5), k, v, config))
        out_m = mfn(q, k, v)
        seconds = time_jax(mfn, q, k, v, iters=5)
        result["jax_mosaic_attention"] = {"seconds": seconds, "tflop_s": flops / seconds / 1e12,
                                          "rel_err_vs_torch": rel_err(out_m, reference)}
    except Exception as e:  # report, do not hide, a peer that fails to run here
        result["jax_mosaic_attention"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return result


def fp8_case(batch: int, seq: int, tokens: int, rng: np.random.Generator,
             impl: str = "gpu") -> dict:
    """Issue 28's rows: the kernel the engine dispatches to (kernels.paged_attention) on bf16
    pages and on the same values rounded to float8_e4m3fn pages (scale 1.0), for a decode call
    of batch rows x seq keys (pages scattered) and a causal prefill of `tokens` tokens; each
    checked against the float32 reference on the pages it read. Decode in keys per second (and
    KV bytes per second), prefill in FLOP/s; "speedup" is fp8's rate over bf16's."""
    import kernels
    attend = jax.jit(functools.partial(kernels.paged_attention, impl=impl))
    kq, kk, kv, kp = jax.random.split(jax.random.key(int(rng.integers(2**31))), 4)
    pages = batch * (seq // PAGE) + 1
    shape = (pages, PAGE, K_HEADS, HEAD_DIM)
    k16 = jax.random.normal(kk, shape, jnp.bfloat16)
    v16 = jax.random.normal(kv, shape, jnp.bfloat16)
    table = jnp.asarray(1 + rng.permutation(pages - 1).reshape(batch, -1), jnp.int32)
    lengths = jnp.full((batch,), seq, jnp.int32)
    decode = (jax.random.normal(kq, (batch, 1, N_HEADS, HEAD_DIM), jnp.bfloat16), table,
              lengths[:, None] - 1, lengths)
    prefill_pages = tokens // PAGE
    prefill = (jax.random.normal(kp, (1, tokens, N_HEADS, HEAD_DIM), jnp.bfloat16),
               jnp.arange(1, prefill_pages + 1, dtype=jnp.int32)[None],
               jnp.arange(tokens, dtype=jnp.int32)[None], jnp.array([tokens], jnp.int32))
    flops = 4 * tokens * tokens * HEAD_DIM * N_HEADS // 2
    result = {"batch": batch, "seq": seq, "prefill_tokens": tokens, "head_dim": HEAD_DIM}
    for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
        k, v = k16.astype(dtype), v16.astype(dtype)
        name = jnp.dtype(dtype).name
        row = {}
        # case: operands, work, its rate's name and unit, timed calls a repeat
        for case, (q, t, pos, n), work, rate, unit, iters in (
                ("decode", decode, batch * seq, "keys_per_s", 1, 20),
                ("prefill", prefill, flops, "tflop_s", 1e12, 5)):
            args = (q, k, v, t, pos, n)
            want = jax.jit(paged_attention_reference)(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), t, pos, n)
            seconds = time_jax(attend, *args, iters=iters)
            row[case] = {"seconds": seconds, rate: work / seconds / unit,
                         "rel_err": rel_err(attend(*args), want)}
        row["decode"]["tb_s"] = 2 * batch * seq * K_HEADS * HEAD_DIM * k.dtype.itemsize \
            / row["decode"]["seconds"] / 1e12
        result[name] = row
    fp8, bf16 = result["float8_e4m3fn"], result["bfloat16"]
    result["speedup"] = {"decode": bf16["decode"]["seconds"] / fp8["decode"]["seconds"],
                         "prefill": bf16["prefill"]["seconds"] / fp8["prefill"]["seconds"]}
    return result


def moe_case(tokens: int, rng: np.random.Generator, impl: str = "gpu", experts=128,
             hidden=2048, width=768, top_k=8) -> dict:
    """The experts' grouped product (Qwen3-30B-A3B's shapes by default) of a step of `tokens`
    tokens (each routed to top_k of the experts at random, rows sorted by expert), bf16:
    kernels.grouped_matmul (what the engine runs) against jax.lax.ragged_dot as XLA lowers it,
    for the gate (hidden -> width; up is the same) and down (width -> hidden) projections, each
    checked against ragged_dot in float32. The floor reads each routed expert's weights once:
    weight_tb_s is those bytes a second."""
    import kernels
    expert = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    counts = np.bincount(expert.ravel(), minlength=experts)
    sizes, used = jnp.asarray(counts, jnp.int32), int((counts > 0).sum())
    m = tokens * top_k
    result = {"tokens": tokens, "rows": m, "experts_used": used, "experts": experts}
    exact = jax.jit(lambda a, b, s: jax.lax.ragged_dot(
        a.astype(jnp.float32), b.astype(jnp.float32), s, precision=jax.lax.Precision.HIGHEST))
    for proj, (k, n) in (("gate", (hidden, width)), ("down", (width, hidden))):
        lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        rhs = jnp.asarray(rng.normal(size=(experts, k, n)) / np.sqrt(k), jnp.bfloat16)
        want = exact(lhs, rhs, sizes)
        weight_bytes, flops = used * k * n * 2, 2 * m * k * n
        row = {}
        for name, fn in (("ours", jax.jit(functools.partial(kernels.grouped_matmul, impl=impl))),
                         ("xla_ragged_dot", jax.jit(jax.lax.ragged_dot))):
            seconds = time_jax(fn, lhs, rhs, sizes, iters=10, repeats=5)
            row[name] = {"seconds": seconds, "weight_tb_s": weight_bytes / seconds / 1e12,
                         "tflop_s": flops / seconds / 1e12,
                         "rel_err": rel_err(fn(lhs, rhs, sizes), want)}
        row["speedup"] = row["xla_ragged_dot"]["seconds"] / row["ours"]["seconds"]
        result[proj] = row
    return result


def mixed_lengths(rng: np.random.Generator) -> dict[str, list[int]]:
    """Decode batches of issue 27: rows of one length, and rows of very different lengths."""
    spread = np.exp(rng.uniform(np.log(1024), np.log(262144), 16)).astype(int).tolist()
    return {"64x4096": [4096] * 64, "8x32768": [32768] * 8,
            "1x1M+3x2k": [2**20] + [2048] * 3, "1x128k+63x2k": [131072] + [2048] * 63,
            "16x[1k,256k]": spread}


def mixed_case(name: str, lengths: list[int], head_dim: int, rng: np.random.Generator,
               impl: str = "gpu") -> dict:
    """A decode call over rows of the given lengths (Llama-3.2-1B / 8B attention: 32 query heads,
    8 KV heads, page 16, bf16, pages scattered, a table as wide as the longest row): the
    dispatch (kernels.paged_attention, its plan made inside the jit as the model makes it; the
    JSON names the kernel and whether it ran one item a row) and, beside it, the Triton kernel
    with one item a row whatever the table (what kernels.UNSPLIT_ROWS would cost if it took
    every table), against PyTorch SDPA on the same KV laid out contiguously (one batched call
    when the rows are of one length, else one call a row, times summed) and a device copy of
    the same bytes; each checked against SDPA."""
    import torch
    import torch.nn.functional as F

    import kernels

    pages = [-(-s // PAGE) for s in lengths]
    b, width = len(lengths), max(pages)
    num_pages = sum(pages) + 1                                  # + the trash page
    kq, kk, kv = jax.random.split(jax.random.key(int(rng.integers(2**31))), 3)
    shape = (num_pages, PAGE, K_HEADS, head_dim)
    k_pages = jax.random.normal(kk, shape, jnp.bfloat16)
    v_pages = jax.random.normal(kv, shape, jnp.bfloat16)
    q = jax.random.normal(kq, (b, 1, N_HEADS, head_dim), jnp.bfloat16)
    ids = 1 + rng.permutation(num_pages - 1)
    table = np.zeros((b, width), np.int32)
    starts = np.cumsum([0] + pages)
    for r, n in enumerate(pages):
        table[r, :n] = ids[starts[r]:starts[r] + n]
    args = (q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths, jnp.int32)[:, None] - 1,
            jnp.asarray(lengths, jnp.int32))
    kv_bytes = 2 * sum(lengths) * K_HEADS * head_dim * 2

    @jax.jit
    def ours(q, k, v, t, pos, lens):
        work = kernels.decode_work(q, k, t, pos, lens, impl=impl)
        return kernels.paged_attention(q, k, v, t, pos, lens, impl=impl, work=work)

    unsplit = functools.partial(paged_attention_gpu, items=b)
    runs = {}
    for key, fn in (("ours", ours), ("unsplit_triton", unsplit)):
        seconds = time_jax(fn, *args)
        runs[key] = {"seconds": seconds, "tb_s": kv_bytes / seconds / 1e12,
                     "out": np.asarray(fn(*args), np.float32)[:, 0]}
    result = {"case": name, "head_dim": head_dim, "rows": b, "keys": sum(lengths),
              "kv_bytes": kv_bytes,
              "kernel": kernels._kernel_for(q, k_pages, table, kernels.resolve_impl(impl), None),
              "one_item_a_row": kernels._unsplit(q, k_pages, table),
              **{key: {k: v for k, v in run.items() if k != "out"} for key, run in runs.items()}}

    def dense(pool, r):                                         # [1,K,S,H]
        rows = pool[jnp.asarray(table[r, :pages[r]])].reshape(-1, K_HEADS, head_dim)
        return to_torch(jnp.transpose(rows[:lengths[r]][None], (0, 2, 1, 3)))
    tq = to_torch(jnp.transpose(q, (0, 2, 1, 3)))               # [B,N,1,H]
    sdpa = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)
    with torch.no_grad():
        if len(set(lengths)) == 1:
            tk = torch.cat([dense(k_pages, r) for r in range(b)])
            tv = torch.cat([dense(v_pages, r) for r in range(b)])
            want = sdpa(tq, tk, tv)[:, :, 0].float().cpu().numpy()
            seconds = time_torch(lambda: sdpa(tq, tk, tv))
        else:
            kvs = [(dense(k_pages, r), dense(v_pages, r)) for r in range(b)]
            want = np.concatenate([sdpa(tq[r:r + 1], *kvs[r])[:, :, 0].float().cpu().numpy()
                                   for r in range(b)])
            seconds = sum(time_torch(lambda r=r: sdpa(tq[r:r + 1], *kvs[r])) for r in range(b))
            del kvs
    for key, run in runs.items():
        result[key]["rel_err_vs_sdpa"] = rel_err(run["out"], want)
    result["torch_sdpa"] = {"seconds": seconds, "tb_s": kv_bytes / seconds / 1e12,
                            "calls": 1 if len(set(lengths)) == 1 else b}
    result["ours_vs_sdpa"] = result["torch_sdpa"]["seconds"] / result["ours"]["seconds"]
    flat = jnp.concatenate([k_pages.reshape(-1), v_pages.reshape(-1)])[:kv_bytes // 2]
    seconds = time_jax(jax.jit(lambda x: x + jnp.bfloat16(1)), flat)
    result["device_copy"] = {"seconds": seconds, "tb_s_read_write": 2 * kv_bytes / seconds / 1e12}
    return result


def grid(**axes) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/kernels.json")
    p.add_argument("--quick", action="store_true",
                   help="one config per shape: the kernels' defaults (what the engine runs)")
    p.add_argument("--commit", default=None, help="commit measured (default: git HEAD)")
    p.add_argument("--cases", default="decode,prefill,mixed",
                   help="which of decode, prefill, mixed (decode batches of mixed lengths, "
                        "head_dim 64 and 128), fp8 (bf16 against fp8 pages), moe (the experts' "
                        "grouped product) to run")
    args = p.parse_args()
    cases = set(args.cases.split(","))
    rng = np.random.default_rng()
    if args.quick:
        triton_sweep = [dict(pages_per_block=None, items=None, num_warps=None,
                             num_stages=None)]
        prefill_sweep = [dict(block_rows=128, pages_per_block=None, num_warps=None,
                              num_stages=None)]
        mosaic_sweep = [dict(block_kv=128, stages=2)]
    else:
        triton_sweep = grid(pages_per_block=[4, 8], items=[None], num_warps=[2, 4],
                            num_stages=[3, 4])
        prefill_sweep = grid(block_rows=[128, 256], pages_per_block=[4, 8], num_warps=[4, 8],
                             num_stages=[2, 3])
        mosaic_sweep = [dict(block_kv=128, stages=2), dict(block_kv=64, stages=2),
                        dict(block_kv=64, stages=3), dict(block_kv=128, stages=2, p_in_smem=True)]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "commit": commit,
              "command": "python bench/kernels.py" + (" --quick" if args.quick else "")
              + (f" --cases {args.cases}" if cases != {"decode", "prefill", "mixed"} else ""),
              "decode": [], "prefill": [], "mixed": [], "fp8": [], "moe": []}
    for batch, seq in [(64, 4096), (8, 32768), (1, 131072)] if "decode" in cases else []:
        # Mosaic GPU decode: the default (None: what the engine runs), then twice the items
        # (two programs an SM), each with one and two slots of pages in flight.
        items = worklist.default_items(batch)
        decode_sweep = [dict(items=None, stages=None)]
        if not args.quick:
            decode_sweep += grid(items=[items, 2 * items], stages=[1, 2])
        report["decode"].append(decode_case(batch, seq, decode_sweep, triton_sweep, rng))
        print(json.dumps(report["decode"][-1]["best"]), flush=True)
    if "prefill" in cases:
        report["prefill"].append(prefill_case(8192, prefill_sweep, mosaic_sweep, rng))
    for batch, seq in [(64, 4096), (8, 32768)] if "fp8" in cases else []:
        report["fp8"].append(fp8_case(batch, seq, 8192, rng))
        print(json.dumps(report["fp8"][-1]), flush=True)
    for tokens in [1, 64, 512, 4096] if "moe" in cases else []:
        report["moe"].append(moe_case(tokens, rng))
        print(json.dumps(report["moe"][-1]), flush=True)
    for name, lengths in mixed_lengths(rng).items() if "mixed" in cases else []:
        for head_dim in (64, 128):
            report["mixed"].append(mixed_case(name, lengths, head_dim, rng))
            print(json.dumps(report["mixed"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{report['device']}  jax {report['jax']}  {report['date']}  {commit}")
    print(f"{'decode B x S':>16} {'ours':>7} {'default':>7} {'softcap':>7} {'contig':>7} "
          f"{'triton':>7} {'jax pg':>7} {'sdpa':>7} {'copy':>7}  TB/s (copy: read+write)")
    for r in report["decode"]:
        print(f"{r['batch']:>6} x {r['seq']:<7} {r['best']['tb_s']:7.2f} "
              f"{r['ours'][0]['tb_s']:7.2f} {r['ours_softcap']['tb_s']:7.2f} "
              f"{r['ours_contiguous_table']['tb_s']:7.2f} "
              f"{r['best_triton']['tb_s']:7.2f} {r['jax_paged']['tb_s']:7.2f} "
              f"{r['torch_sdpa']['tb_s']:7.2f} {r['device_copy']['tb_s_read_write']:7.2f}")
    print(f"{'mixed decode':>16} {'H':>4} {'ours':>7} {'unsplit':>7} {'sdpa':>7} {'copy':>7} "
          f"{'ours/sdpa':>9}  TB/s (copy: read+write); ours = the dispatch's kernel")
    for r in report["mixed"]:
        print(f"{r['case']:>16} {r['head_dim']:>4} {r['ours']['tb_s']:7.2f} "
              f"{r['unsplit_triton']['tb_s']:7.2f} "
              f"{r['torch_sdpa']['tb_s']:7.2f} {r['device_copy']['tb_s_read_write']:7.2f} "
              f"{r['ours_vs_sdpa']:9.2f}  {r['kernel']}{' one item a row' * r['one_item_a_row']}")
    for r in report["fp8"]:
        b, f = r["bfloat16"], r["float8_e4m3fn"]
        print(f"fp8 {r['batch']:>4} x {r['seq']:<6} decode keys/s bf16 {b['decode']['keys_per_s']:.3g}"
              f" fp8 {f['decode']['keys_per_s']:.3g} ({r['speedup']['decode']:.2f}x); prefill "
              f"{r['prefill_tokens']} TFLOP/s bf16 {b['prefill']['tflop_s']:.0f} fp8 "
              f"{f['prefill']['tflop_s']:.0f} ({r['speedup']['prefill']:.2f}x)")
    for r in report["moe"]:
        print(f"moe {r['tokens']:>5} tokens ({r['experts_used']} experts): " + "; ".join(
            f"{p} ours {r[p]['ours']['seconds'] * 1e6:.0f} us ({r[p]['ours']['weight_tb_s']:.2f} "
            f"TB/s of weights), ragged_dot {r[p]['xla_ragged_dot']['seconds'] * 1e6:.0f} us "
            f"({r[p]['speedup']:.1f}x)" for p in ("gate", "down")))
    for r in report["prefill"]:
        mosaic = r["jax_mosaic_attention"].get("tflop_s", float("nan"))
        print(f"prefill {r['tokens']} causal: ours mosaic {r['best_mosaic']['tflop_s']:.0f}  "
              f"ours triton {r['best']['tflop_s']:.0f}  "
              f"sdpa {r['torch_sdpa']['tflop_s']:.0f}  mosaic {mosaic:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
