"""bench/api_cost.py on the CPU with the tiny model: one server, a warm-up and a measured pass
per case; every request of every case completes, and the costs are against plain's mean."""

import json

import pytest
from helpers import bench_module

api_cost = bench_module("api_cost")


def test_api_cost_bench_runs_every_case(tmp_path):
    out = tmp_path / "api-cost.json"
    api_cost.main(["--model", "tiny-random", "--skip-warmup", "--rounds", "1",
                   "--context-length", "256", "--prompts", "4", "--input-len", "16",
                   "--output-len", "8", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == list(api_cost.CASES)
    for case in summary.values():
        assert case["completed"] == [4] and case["mean"] > 0
        assert case["cost_vs_plain"] == pytest.approx(
            1 - case["mean"] / summary["plain"]["mean"])
    assert summary["plain"]["output_tokens"] == [4 * 8]
