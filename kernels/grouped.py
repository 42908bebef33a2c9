"""Grouped matrix product for mixture-of-experts layers, with jax.lax.ragged_dot's contract:
lhs [M,K] rows sorted by group, group g's `group_sizes[g]` rows times rhs[g] [K,N] -> [M,N].

XLA's GPU lowering of ragged_dot (jax 0.11) expands it into a dense product per group. On an
H100 at Qwen3-30B-A3B's expert shapes (128 experts, 2048 x 768, 8 a token) it took 430 us for
the gate projection of 64 tokens (3.6x the time to read the weights once) and 19.5 ms with 17
GB of scratch for a 4096-token chunk (~110x the time to read its weights and rows once: the
scratch is the rows copied once per expert, [128, 32768, 2048], and 128x the FLOPs run at ~680
TFLOP/s); XLA's cuDNN ragged-dot flag changed nothing there. Here a Pallas kernel (the Triton
path) gives each program one tile: up to `block_m` consecutive rows of one group and `block_n`
output columns, read through its K in `block_k` steps. The tile table is built on the device
from group_sizes: group g gets ceil(size / block_m) tiles, at most ceil(M / block_m) + G in
all (a static grid; tiles past the last are empty and return at once). A step so reads each
used expert's weights once per tile of its rows: once in decode, where an expert gets a few
rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.gpu import _pow2


def tile_table(group_sizes, block_m: int, num_tiles: int):
    """int32 [3, num_tiles]: each tile's group, first row and end row (rows [first, end) of
    the sorted lhs). Tiles past the last have first == end (nothing to do)."""
    sizes = group_sizes.astype(jnp.int32)
    per_group = (sizes + block_m - 1) // block_m
    tiles_end = jnp.cumsum(per_group)                            # [G]
    rows_start = jnp.cumsum(sizes) - sizes
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    # A compare-all count instead of searchsorted (a loop of host-visible steps on a GPU).
    group = jnp.sum(tiles_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
    real = group < sizes.shape[0]
    g = jnp.minimum(group, sizes.shape[0] - 1)
    first = rows_start[g] + (t - (tiles_end[g] - per_group[g])) * block_m
    end = jnp.minimum(first + block_m, rows_start[g] + sizes[g])
    return jnp.stack([g, jnp.where(real, first, 0), jnp.where(real, end, 0)])


def _kernel(table_ref, lhs_ref, rhs_ref, o_ref, *, block_m: int, block_n: int, block_k: int):
    exact = jax.lax.Precision.HIGHEST if lhs_ref.dtype == jnp.float32 else None  # no TF32
    t, j = pl.program_id(0), pl.program_id(1)
    g, first, end = table_ref[0, t], table_ref[1, t], table_ref[2, t]
    k_dim = lhs_ref.shape[1]
    n_dim = rhs_ref.shape[2]

    @pl.when(end > first)
    def _():
        rows = first + jnp.arange(block_m) < end
        cols = pl.ds(j * block_n, block_n)
        col_ok = j * block_n + jnp.arange(block_n) < n_dim

        def body(i, acc):
            ks = pl.ds(i * block_k, block_k)
            k_ok = i * block_k + jnp.arange(block_k) < k_dim
            x = plgpu.load(lhs_ref.at[pl.ds(first, block_m), ks],
                           mask=rows[:, None] & k_ok[None, :], other=0)
            w = plgpu.load(rhs_ref.at[g, ks, cols], mask=k_ok[:, None] & col_ok[None, :],
                           other=0)
            return acc + plgpu.dot(x, w, precision=exact)          # float32 out

        acc = jax.lax.fori_loop(0, pl.cdiv(k_dim, block_k), body,
                                jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(first, block_m), cols], acc.astype(o_ref.dtype),
                    mask=rows[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret",
                                             "num_warps", "num_stages"))
def grouped_matmul(lhs, rhs, group_sizes, *, block_m=None, block_n=128, block_k=64,
                   interpret=False, num_warps=4, num_stages=3):
    """lhs [M,K], rhs [G,K,N], group_sizes [G] summing to M (every row belongs to a group:
    rows past the sum are never written) -> [M,N] in lhs' dtype, accumulated in float32.
    block_m defaults to the average rows a group, as a power of two in [16, 64] (a decode
    step's experts get a few rows each)."""
    m, k = lhs.shape
    g, _, n = rhs.shape
    if block_m is None:
        block_m = min(64, max(16, _pow2(-(-m // g))))
    block_n = min(block_n, max(16, _pow2(n)))
    block_k = min(block_k, max(16, _pow2(k)))
    num_tiles = pl.cdiv(m, block_m) + g
    table = tile_table(group_sizes, block_m, num_tiles)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))    # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k),
        grid=(num_tiles, pl.cdiv(n, block_n)),
        in_specs=[whole(table.shape), whole(lhs.shape), whole(rhs.shape)],
        out_specs=whole((m, n)),
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="hybridkv_grouped_matmul",
    )(table, lhs, rhs)
