"""Layout policy, pool description and sizing, and the usage report."""

import dataclasses
import math

import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcache
from kvcache import LAYOUT_PAGED, LAYOUT_STATIC, LayoutPolicy, PoolDoesNotFit, PoolSpec

# -- LayoutPolicy ---------------------------------------------------------------------------

lengths = st.integers(1, 5000)


def admission(policy, prompt, max_new, page_size, held=0):
    a = policy.admit(prompt, prompt + max_new, page_size, held)
    return a.layout, a.take


@settings(max_examples=200, deadline=None, database=None)
@given(prompt=lengths, max_new=lengths, limit=st.integers(0, 6000),
       page_size=st.sampled_from([1, 4, 16, 64]))
def test_hybrid_is_static_iff_the_request_fits_static_max_tokens(prompt, max_new, limit,
                                                                 page_size):
    policy = LayoutPolicy("hybrid", static_max_tokens=limit)
    kind, pages = admission(policy, prompt, max_new, page_size)
    assert kind == ("static" if prompt + max_new <= limit else "paged")
    assert kind == policy.choose(prompt + max_new)
    same = admission(LayoutPolicy(kind, static_max_tokens=limit), prompt, max_new, page_size)
    assert same == (kind, pages), "hybrid must reserve what the layout it picked reserves"


@settings(max_examples=200, deadline=None, database=None)
@given(prompt=lengths, max_new=lengths, page_size=st.sampled_from([1, 4, 16, 64]),
       hit=st.integers(0, 50))
def test_pages_at_admission(prompt, max_new, page_size, hit):
    hit = min(hit, (prompt - 1) // page_size)        # a prefix hit leaves a token to feed
    static = LayoutPolicy("static", static_max_tokens=0).admit(prompt, prompt + max_new,
                                                               page_size, hit)
    paged = LayoutPolicy("paged", static_max_tokens=10**9).admit(prompt, prompt + max_new,
                                                                 page_size, hit)
    # The last sampled token is never stored: prompt + max_new - 1 tokens at most.
    most = math.ceil((prompt + max_new - 1) / page_size)
    assert most == kvcache.max_pages(prompt + max_new, page_size)
    assert static == kvcache.Admission("static", most - hit, most - hit)
    assert paged == kvcache.Admission("paged", math.ceil(prompt / page_size) - hit, 0)
    assert most * page_size >= prompt + max_new - 1 > (most - 1) * page_size
    # A static row never grows; a paged one grows by the pages its next tokens fill.
    assert LayoutPolicy.grow("static", prompt + max_new, 0, page_size) == 0
    assert LayoutPolicy.grow("paged", prompt + 1, math.ceil(prompt / page_size),
                             page_size) == int(prompt % page_size == 0)
    assert LayoutPolicy.preemptible("paged") and not LayoutPolicy.preemptible("static")


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_fixed_layouts_ignore_static_max_tokens(layout):
    policy = LayoutPolicy(layout, static_max_tokens=8)
    assert policy.choose(1) == policy.choose(10**6) == layout


def test_a_resumed_request_keeps_its_first_layout():
    assert LayoutPolicy("paged").admit(5, 10, 16, layout="static") == kvcache.Admission(
        "static", 1, 1)


def test_hybrid_boundary_is_inclusive():
    policy = LayoutPolicy("hybrid", static_max_tokens=100)
    assert policy.choose(100) == "static" and policy.choose(101) == "paged"
    assert admission(policy, 60, 40, 16) == ("static", 7)   # 99 tokens stored
    assert admission(policy, 60, 41, 16) == ("paged", 4)


def test_unknown_layout_names_the_choices():
    with pytest.raises(ValueError) as err:
        LayoutPolicy("contiguous")
    message = str(err.value)
    assert "'contiguous'" in message
    for name in kvcache.LAYOUTS:
        assert name in message
    with pytest.raises(ValueError, match="static_max_tokens"):
        LayoutPolicy("hybrid", static_max_tokens=-1)


# -- PoolSpec -------------------------------------------------------------------------------

def spec(**kw):
    base = dict(num_layers=3, num_pages=10, page_size=16, num_kv_heads=2, head_dim=8,
                dtype="bfloat16")
    return PoolSpec(**{**base, **kw})


@pytest.mark.parametrize("page_size", [0, -4, 3, 6, 12, 24, 100])
def test_page_size_must_be_a_power_of_two(page_size):
    with pytest.raises(ValueError, match=rf"page_size must be a power of two, got {page_size}"):
        spec(page_size=page_size)


@pytest.mark.parametrize("page_size", [1, 2, 4, 16, 256])
def test_powers_of_two_are_accepted(page_size):
    assert spec(page_size=page_size).page_size == page_size


def test_pool_needs_a_page_beside_the_trash_page():
    with pytest.raises(ValueError, match="num_pages must be >= 2"):
        spec(num_pages=1)


def test_pool_description():
    s = spec()
    kv = s.layer_struct
    assert kv.shape == (10, 16, 2, 8) and kv.dtype == jnp.bfloat16
    assert s.bytes_per_token == 2 * 3 * 2 * 8 * 2          # K and V, L, K heads, H, bf16
    assert s.bytes_per_page == s.bytes_per_token * 16
    assert s.total_bytes == 3 * 2 * math.prod(kv.shape) * 2    # L x (K, V), 2 bytes each
    assert s.capacity_tokens == 9 * 16
    cache = kvcache.init_cache(dataclasses.replace(s, dtype="float32"), 2, 3)
    assert len(cache.k) == len(cache.v) == 3
    assert all(x.shape == kv.shape and x.dtype == jnp.float32 for x in cache.k + cache.v)
    assert kvcache.nbytes((cache.k, cache.v)) == dataclasses.replace(s, dtype="float32").total_bytes


# -- size_pool ------------------------------------------------------------------------------

@dataclasses.dataclass
class FakeDevice:
    """Just enough of a jax.Device for size_pool: a GPU with a known allocator limit."""
    bytes_limit: int
    platform: str = "gpu"
    in_use: int = 0

    def memory_stats(self):
        return {"bytes_limit": self.bytes_limit, "bytes_in_use": self.in_use}

    def __str__(self):
        return "FakeGPU(id=0)"


MODEL = dict(num_layers=2, page_size=16, num_kv_heads=2, head_dim=64, dtype="float16")
BYTES_PER_PAGE = 2 * 2 * 2 * 64 * 2 * 16   # 16,384


def size(**kw):
    args = dict(MODEL, weight_bytes=1_000_000, device=FakeDevice(10_000_000),
                mem_fraction_static=0.5, max_total_tokens=None, default_tokens=10**9)
    return kvcache.size_pool(**{**args, **kw})


def test_device_memory_comes_from_the_allocator_limit():
    assert kvcache.device_memory_bytes(FakeDevice(123_456)) == 123_456


def test_a_device_without_a_memory_limit_asks_for_max_total_tokens():
    with pytest.raises(ValueError, match="--max-total-tokens"):
        kvcache.device_memory_bytes(FakeDevice(0, platform="tpu"))


@pytest.mark.parametrize("tokens", [16, 17, 100, 4096])
def test_max_total_tokens_sets_the_pages(tokens):
    s = size(max_total_tokens=tokens, device=FakeDevice(10**9))
    assert s.num_pages == math.ceil(tokens / 16) + 1            # plus the trash page
    assert s.capacity_tokens >= tokens > s.capacity_tokens - 16
    assert s.bytes_per_page == BYTES_PER_PAGE
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.dtype) == (2, 2, 64, "float16")


def test_mem_fraction_fills_what_the_weights_leave():
    # 0.5 * 10,000,000 - 1,000,000 = 4,000,000 bytes -> 244 pages of 16,384 bytes
    s = size()
    assert s.num_pages == 4_000_000 // BYTES_PER_PAGE == 244
    assert s.total_bytes <= 4_000_000 < s.total_bytes + BYTES_PER_PAGE
    s = size(mem_fraction_static=0.9)
    assert s.num_pages == 8_000_000 // BYTES_PER_PAGE


def test_mem_fraction_is_capped_by_default_tokens():
    assert size(default_tokens=100).num_pages == math.ceil(100 / 16) + 1


def test_too_many_tokens_says_what_is_needed_available_and_which_flag():
    with pytest.raises(PoolDoesNotFit) as err:
        size(max_total_tokens=4096)   # 257 pages * 16,384 = 4,210,688 > 4,000,000
    message = str(err.value)
    assert f"{257 * BYTES_PER_PAGE:,}" in message
    assert "4,000,000" in message
    assert "--max-total-tokens" in message and "--mem-fraction-static" in message
    assert "FakeGPU" in message
    assert isinstance(err.value, ValueError)


def test_weights_that_leave_no_room_say_so():
    with pytest.raises(PoolDoesNotFit) as err:
        size(weight_bytes=4_990_000)          # 10,000 bytes left: not even one page
    message = str(err.value)
    assert f"{BYTES_PER_PAGE:,}" in message and "10,000" in message
    assert "--mem-fraction-static" in message
    with pytest.raises(PoolDoesNotFit) as err:
        size(weight_bytes=6_000_000)          # more weights than the fraction
    assert "0 bytes" in str(err.value) and "6,000,000" in str(err.value)


def test_the_pool_never_takes_more_than_is_free():
    # The fraction leaves 4,000,000 bytes, but the allocator holds 7,000,000 of its 10,000,000.
    busy = FakeDevice(10_000_000, in_use=7_000_000)
    assert size(device=busy).num_pages == 3_000_000 // BYTES_PER_PAGE
    with pytest.raises(PoolDoesNotFit, match=r"but 3,000,000 bytes are free on FakeGPU"):
        size(device=busy, max_total_tokens=200 * 16)


def test_a_cpu_pool_has_a_default_budget_and_never_more_than_is_free(monkeypatch):
    gib = 1 << 30
    cpu = FakeDevice(0, platform="cpu")
    monkeypatch.setattr(kvcache.pool, "host_memory", lambda: (64 * gib, 32 * gib))
    s = size(device=cpu, weight_bytes=0)             # the fraction would give 32 GiB
    assert s.total_bytes <= kvcache.pool.CPU_POOL_BYTES < s.total_bytes + BYTES_PER_PAGE
    tokens = 16 * (8 * gib // BYTES_PER_PAGE)        # asked for: 8 GiB, free: 32
    assert size(device=cpu, weight_bytes=0, max_total_tokens=tokens).capacity_tokens == tokens
    monkeypatch.setattr(kvcache.pool, "host_memory", lambda: (64 * gib, gib))
    assert size(device=cpu, weight_bytes=0).total_bytes <= gib
    with pytest.raises(PoolDoesNotFit, match=f"but {gib:,} bytes are free on"):
        size(device=cpu, weight_bytes=0, max_total_tokens=tokens)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_mem_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="mem_fraction_static"):
        size(mem_fraction_static=fraction)


def test_max_total_tokens_below_a_page():
    with pytest.raises(ValueError, match="max_total_tokens"):
        size(max_total_tokens=8)


# -- accounting.usage -----------------------------------------------------------------------

def test_usage_of_one_static_and_one_paged_row():
    s = PoolSpec(num_layers=2, num_pages=16, page_size=4, num_kv_heads=2, head_dim=3,
                 dtype="float32")
    g, bpt = 4, 2 * 2 * 2 * 3 * 4
    assert s.bytes_per_token == bpt
    cache = kvcache.init_cache(s, 3, 5)
    # Row 2 static: prompt 5, max_new 6 -> 10 stored at most -> 3 pages; 7 tokens so far.
    # Row 0 paged: prompt 9 -> 3 pages; decoded up to 13 tokens -> 4 pages.
    static_pages = kvcache.LayoutPolicy("static").admit(5, 11, g).take
    paged_pages = kvcache.LayoutPolicy("paged").admit(9, 109, g).take
    assert (static_pages, paged_pages) == (3, 3)
    cache, ok = kvcache.admit_rows(cache, jnp.array([2, 0]),
                                   jnp.array([LAYOUT_STATIC, LAYOUT_PAGED]),
                                   jnp.array([static_pages, paged_pages]), 5)
    assert bool(ok.all())
    cache = dataclasses.replace(cache, lengths=jnp.array([12, 0, 7], jnp.int32))
    cache, ok = kvcache.ensure_slots(cache, jnp.array([0, 2]), jnp.array([1, 1]), 1)
    assert bool(ok.all())
    cache = dataclasses.replace(cache, lengths=jnp.array([13, 0, 7], jnp.int32))

    report = kvcache.usage(cache)
    assert report["static"] == {"rows": 1, "reserved_pages": 3, "used_pages": 2, "tokens": 7,
                                "waste_tokens": 5, "waste_bytes": 5 * bpt}
    assert report["paged"] == {"rows": 1, "reserved_pages": 4, "used_pages": 4, "tokens": 13,
                               "waste_tokens": 3, "waste_bytes": 3 * bpt}
    assert report["pool"] == {"pages": 15, "free_pages": 15 - 7, "page_size": 4,
                              "bytes_per_token": bpt}
