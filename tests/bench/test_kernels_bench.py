"""bench/kernels.py's fp8 and MoE rows on the CPU (interpret mode, tiny shapes): both dtypes
(both products) run, each result checked against the reference, and the rates and speed-ups
are reported."""

import numpy as np
from helpers import bench_module

kernels_bench = bench_module("kernels")


def test_fp8_case_checks_and_times_both_dtypes():
    result = kernels_bench.fp8_case(2, 32, 32, np.random.default_rng(0), impl="gpu-interpret")
    for name in ("bfloat16", "float8_e4m3fn"):
        row = result[name]
        assert row["decode"]["keys_per_s"] > 0 and row["prefill"]["tflop_s"] > 0
        assert row["decode"]["rel_err"] < 0.02 and row["prefill"]["rel_err"] < 0.02
    # fp8 pages are half the bytes: the same keys, half the KV bytes a second at equal time.
    bf16, fp8 = result["bfloat16"]["decode"], result["float8_e4m3fn"]["decode"]
    assert np.isclose(fp8["tb_s"] * fp8["seconds"] * 2, bf16["tb_s"] * bf16["seconds"])
    assert set(result["speedup"]) == {"decode", "prefill"}


def test_moe_case_checks_and_times_both_products():
    result = kernels_bench.moe_case(5, np.random.default_rng(0), impl="gpu-interpret",
                                    experts=6, hidden=32, width=16, top_k=2)
    assert result["rows"] == 10 and 1 <= result["experts_used"] <= 6
    for proj in ("gate", "down"):
        for name in ("ours", "xla_ragged_dot"):
            row = result[proj][name]
            assert row["seconds"] > 0 and row["weight_tb_s"] > 0 and row["rel_err"] < 0.02
        assert result[proj]["speedup"] > 0
