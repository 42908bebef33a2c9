"""Attention kernels over a paged KV cache, and the one function that dispatches to them.

Axis alphabet, used in every shape comment, einsum and BlockSpec of the project:

    B batch rows           T query tokens per row    S key positions
    N query heads          K KV heads                Q query heads per KV head (N = K * Q)
    H head dim             P pages in the pool       G tokens per page (page size)
    M pages per row (page-table width)               R cache rows (sequence slots)
    L layers               V vocabulary              D model width        F MLP width

A row's tokens live in pages; the page table maps (row, position // G) to a page id and
position % G is the slot inside it:

    page_table[b] = [ 7, 3, 9, 0, ...]      position s -> page page_table[b, s // G], slot s % G
                      |  |  |  '-- page 0: reserved trash page, never holds a live token
                      '--'--'----- pages 7, 3, 9 hold positions [0, G), [G, 2G), [2G, 3G)
"""

import jax

from kernels.reference import paged_attention_reference

IMPLEMENTATIONS = ("auto", "reference", "gpu", "tpu", "gpu-interpret", "tpu-interpret")


def resolve_impl(impl: str) -> str:
    """An attention implementation name -> the concrete one that will run.

    'auto' is the compiled kernel of the default backend (GPU or TPU) and the jnp reference on
    a CPU; 'gpu-interpret' / 'tpu-interpret' run the same Pallas kernels in interpret mode on
    any backend.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of "
                         f"{list(IMPLEMENTATIONS)}")
    backend = jax.default_backend()
    if impl == "auto":
        return backend if backend in ("gpu", "tpu") else "reference"
    if impl in ("gpu", "tpu") and backend != impl:
        raise ValueError(f"attention implementation {impl!r} needs a {impl.upper()} backend, "
                         f"but JAX runs on {backend!r}; use '{impl}-interpret' or 'reference'")
    return impl


def compute_capability() -> float:
    """The default device's CUDA compute capability (9.0 for an H100), 0 off NVIDIA GPUs."""
    return float(getattr(jax.devices()[0], "compute_capability", "0") or 0)


def _hopper_or_newer() -> bool:
    """Whether the default GPU has wgmma and TMA (compute capability 9.0 or later)."""
    return compute_capability() >= 9.0


# Decode calls of at least UNSPLIT_ROWS rows over a page table of at most UNSPLIT_MAX_KEYS key
# slots a row run on the Triton kernel with one work item a row: no row is long enough to be
# worth splitting, so there is no merge of partials, whose fixed cost (~13-16 us a call) such
# calls cannot hide. Measured on the H100 at 32 query heads, 8 KV heads, page 16, 64 rows of
# 512-640 keys over a 256-page table: 59 us (head_dim 64; 75 at 128) against 93 (95) for the
# Mosaic kernel's split plan; 64 rows of 2-4k keys: 193 us (327) against 232 (348); and the
# serving bench (bench/throughput.py, 1B shape, 64 running, context 4096) at 18,062-18,182
# output tokens/s against 15,968-16,785 (BENCHMARKS "the no-regression check"). A wider table
# keeps the split plan: there one row may be long enough (a 128k row beside 63 of 2k) that one
# program a KV head would leave the rest of the GPU idle.
UNSPLIT_ROWS = 64
UNSPLIT_MAX_KEYS = 8192


def _unsplit(q, k_pages, page_table) -> bool:
    """Whether a call is a decode call that runs one work item a row (see UNSPLIT_ROWS)."""
    return (q.shape[1] == 1 and q.shape[0] >= UNSPLIT_ROWS
            and page_table.shape[1] * k_pages.shape[1] <= UNSPLIT_MAX_KEYS)


def _kernel_for(q, k_pages, page_table, impl: str, sliding_window) -> str:
    """Which kernel paged_attention runs for these operands (impl resolved): 'reference',
    'mgpu-decode', 'mgpu-prefill', 'triton' or 'tpu'."""
    if impl == "reference":
        return "reference"
    if impl.startswith("tpu"):
        return "tpu"
    from kernels import mgpu
    if (impl == "gpu-interpret" or _hopper_or_newer()) and not _unsplit(q, k_pages, page_table):
        if q.shape[1] == 1 and mgpu.supports_decode(q, k_pages, page_table):
            return "mgpu-decode"
        if q.shape[1] > 1 and mgpu.supports(q, k_pages, sliding_window):
            return "mgpu-prefill"
    return "triton"


def decode_work(q, k_pages, page_table, q_positions, kv_lens, *, impl="auto",
                sliding_window=None):
    """The work plan (kernels/worklist.py) that paged_attention's decode kernel would make for
    these operands, or None where the call takes none (prefill, reference, TPU). q and k_pages
    may be shapes (jax.ShapeDtypeStruct). Made once per model step and passed to every layer's
    call as `work=`, it costs one plan a step instead of one a layer."""
    kernel = _kernel_for(q, k_pages, page_table, resolve_impl(impl), sliding_window)
    if q.shape[1] != 1 or kernel not in ("mgpu-decode", "triton"):
        return None
    from kernels import gpu, mgpu
    if kernel == "mgpu-decode":
        return mgpu.decode_work(q.shape, k_pages.shape, q_positions, kv_lens,
                                sliding_window=sliding_window)
    return gpu.decode_work(q.shape, k_pages.shape, q_positions, kv_lens,
                           sliding_window=sliding_window, items=_triton_items(q, k_pages, page_table))


def _triton_items(q, k_pages, page_table) -> int | None:
    """The Triton decode kernel's work items for a call: one a row (UNSPLIT_ROWS), else its
    default."""
    return q.shape[0] if _unsplit(q, k_pages, page_table) else None


def paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *, impl="auto",
                    sliding_window=None, logit_softcap=None, work=None):
    """Attention of query tokens over the pages of their rows.

    q [B,T,N,H]; k_pages, v_pages [P,G,K,H]; page_table [B,M] int32; q_positions [B,T] int32
    (absolute position of each query token, -1 for padding); kv_lens [B] int32 (tokens stored,
    the new ones included). Key s is visible from query position t iff s <= t, s < kv_len and,
    with a sliding window W, t - s < W. With a logit soft-cap c (Gemma 2's
    attn_logit_softcapping), a logit x = q.k / sqrt(H) becomes c * tanh(x / c) before the
    softmax. Returns [B,T,N,H] in q's dtype; padding rows are zero. work: decode_work's plan for
    these operands (made here when None). Pages may be fp8 (float8_e4m3fn / float8_e5m2, scale
    1.0): every implementation reads them into q's precision, the Mosaic GPU kernels excepted
    (they take pages of q's dtype only, so fp8 calls go to the Triton kernel).

    On a GPU (Hopper or later), decode calls (one query token a row) and calls of more go to
    the Mosaic GPU kernels of kernels/mgpu.py where they apply (fp16/bf16, head_dim 64/128; see
    mgpu.supports_decode and mgpu.supports), everything else to the Triton-lowered kernel
    (kernels/gpu.py).
    """
    impl = resolve_impl(impl)
    for name, value in (("sliding_window", sliding_window), ("logit_softcap", logit_softcap)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be None or a positive number, got {value!r}")
    args = (q, k_pages, v_pages, page_table, q_positions, kv_lens)
    options = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    kernel = _kernel_for(q, k_pages, page_table, impl, sliding_window)
    interpret = impl.endswith("-interpret")
    if kernel == "reference":
        return paged_attention_reference(*args, **options)
    if kernel == "tpu":
        from kernels.tpu import paged_attention_tpu
        return paged_attention_tpu(*args, **options, interpret=interpret)
    from kernels import mgpu
    if kernel == "mgpu-decode":
        return mgpu.paged_decode_mgpu(*args, **options, interpret=interpret, work=work)
    if kernel == "mgpu-prefill":
        return mgpu.paged_prefill_mgpu(*args, logit_softcap=logit_softcap, interpret=interpret)
    from kernels.gpu import paged_attention_gpu
    return paged_attention_gpu(*args, **options, interpret=interpret, work=work,
                               items=_triton_items(q, k_pages, page_table))


def grouped_matmul(lhs, rhs, group_sizes, *, impl="auto"):
    """jax.lax.ragged_dot's product (lhs [M,K] rows sorted by group, group g's group_sizes[g]
    rows times rhs[g] [K,N]; the sizes sum to M) for mixture-of-experts layers. On a GPU, and
    with 'gpu-interpret', the Pallas kernel of kernels/grouped.py (XLA's GPU lowering of
    ragged_dot expands it to a dense product per group: see there); elsewhere ragged_dot
    itself, float32 at full precision."""
    impl = resolve_impl(impl)
    if impl in ("gpu", "gpu-interpret"):
        from kernels.grouped import grouped_matmul as kernel
        return kernel(lhs, rhs, group_sizes, interpret=impl == "gpu-interpret")
    exact = jax.lax.Precision.HIGHEST if lhs.dtype == jax.numpy.float32 else None
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=exact)
