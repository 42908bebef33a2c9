"""bench/startup.py on the CPU with the tiny model: a cold and a warm server start (the
largest programs before ready, the rest in the background), the first token of each, and an
offline LLM's two generates."""

import json

from helpers import bench_module

startup = bench_module("startup")


def test_startup_bench_times_ready_first_token_and_offline(tmp_path):
    out = tmp_path / "startup.json"
    startup.main(["--models", "tiny-random", "--max-running-requests", "2", "--context-length",
                  "256", "--prompts", "2", "--prompt-tokens", "8", "--output-tokens", "4",
                  "--serve-flag=--precompile=background", "--serve-flag=--dtype=float32",
                  "--serve-flag=--chunked-prefill-size=64",
                  "--timeout", "600", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    for run in ("cold", "warm"):
        assert 0 < row[run]["ready_s"] < 600 and 0 < row[run]["first_token_s"] < 600
        # ready on the largest programs (a decode loop, a step of one long chunk, a step of
        # two short ones), the others queued; the first request ran on compiled ones
        assert row[run]["at_ready"]["programs_compiled"] == 3
        assert row[run]["compiles_the_first_request_waited_for"] == 0
    assert row["cold"]["at_ready"]["programs_pending"] > 0
    off = row["offline"]
    assert off["first_generate_s"] > off["second_generate_s"] > 0
