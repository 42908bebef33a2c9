"""kernels/grouped.py: the grouped (mixture-of-experts) product against jax.lax.ragged_dot, in
interpret mode (and compiled under -m gpu), over group sizes with empty groups, one group
holding every row, groups smaller and larger than a tile, shapes that are not multiples of the
blocks; the tile table covers every row exactly once, within its static bound."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.grouped import grouped_matmul, tile_table


def sizes_of(kind: str, m: int, g: int, rng) -> np.ndarray:
    if kind == "one":
        sizes = np.zeros(g, np.int64)
        sizes[g // 2] = m
        return sizes
    sizes = rng.multinomial(m, rng.dirichlet(np.full(g, 0.3 if kind == "skewed" else 5.0)))
    if kind == "skewed" and g > 1:
        sizes[0], sizes[1] = 0, sizes[1] + sizes[0]            # an empty first group too
    return sizes


def reference(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes,
                              precision=jax.lax.Precision.HIGHEST)


CASES = [(40, 24, 20, 5, "skewed", None), (7, 16, 16, 8, "even", None),
         (64, 48, 80, 3, "one", 16), (130, 72, 40, 6, "even", 32), (1, 8, 8, 4, "skewed", None)]


@pytest.mark.parametrize("m, k, n, g, kind, block_m", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matmul_equals_ragged_dot(m, k, n, g, kind, block_m, dtype):
    rng = np.random.default_rng(m * 7 + g)
    sizes = jnp.asarray(sizes_of(kind, m, g, rng), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
    got = grouped_matmul(lhs, rhs, sizes, block_m=block_m, interpret=True)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(lhs, rhs, sizes),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_tiles_cover_every_row_once_within_the_bound(block_m):
    rng = np.random.default_rng(block_m)
    for _ in range(20):
        g, m = int(rng.integers(1, 9)), int(rng.integers(1, 60))
        sizes = sizes_of(["one", "even", "skewed"][int(rng.integers(3))], m, g, rng)
        num_tiles = -(-m // block_m) + g
        group, first, end = np.asarray(tile_table(jnp.asarray(sizes), block_m, num_tiles))
        covered = np.zeros(m, np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for t in range(num_tiles):
            assert 0 <= end[t] - first[t] <= block_m
            if end[t] > first[t]:
                assert starts[group[t]] <= first[t] and end[t] <= starts[group[t] + 1]
                covered[first[t]:end[t]] += 1
        assert (covered == 1).all(), (sizes, block_m)
        assert sum(end > first) == sum(-(-s // block_m) for s in sizes)


def test_the_dispatch_picks_the_kernel_on_gpu_implementations_only():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(12, 16)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
    sizes = jnp.array([5, 0, 7], jnp.int32)
    want = reference(lhs, rhs, sizes)
    for impl in ("reference", "gpu-interpret", "tpu-interpret"):
        np.testing.assert_allclose(kernels.grouped_matmul(lhs, rhs, sizes, impl=impl), want,
                                   rtol=1e-5, atol=1e-5)
    for impl, kernel in (("gpu-interpret", True), ("reference", False), ("tpu-interpret", False)):
        jaxpr = jax.make_jaxpr(functools.partial(kernels.grouped_matmul, impl=impl))(
            lhs, rhs, sizes)
        assert ("pallas_call" in str(jaxpr)) == kernel, impl


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_compiled_kernel_at_qwen3_moe_expert_shapes(tokens):
    """Qwen3-30B-A3B's experts (128, D 2048, F 768, 8 a token), bf16, on the GPU."""
    rng = np.random.default_rng(tokens)
    e, d, f, top = 128, 2048, 768, 8
    expert = np.stack([rng.choice(e, top, replace=False) for _ in range(tokens)]).ravel()
    sizes = jnp.asarray(np.bincount(expert, minlength=e), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(tokens * top, d)), jnp.bfloat16)
    for k, n in ((d, f), (f, d)):
        x = lhs if k == d else lhs[:, :f]
        rhs = jnp.asarray(rng.normal(size=(e, k, n)) / np.sqrt(k), jnp.bfloat16)
        got = kernels.grouped_matmul(x, rhs, sizes, impl="gpu")
        np.testing.assert_allclose(np.asarray(got, np.float32), reference(x, rhs, sizes),
                                   rtol=2e-2, atol=2e-2)
