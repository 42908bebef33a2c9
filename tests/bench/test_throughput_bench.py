"""bench/throughput.py on the CPU with tiny-random: every pass completes every request with the
first pass's tokens, and the rates are reported."""

from helpers import bench_module

throughput = bench_module("throughput")


def test_throughput_bench_times_repeated_passes(tmp_path):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--model", "tiny-random", "--num-prompts", "6", "--input-len", "20",
                              "--output-len", "5", "--vocab-size", "250", "--context-length",
                              "128", "--max-running-requests", "4", "--chunked-prefill-size",
                              "16", "--decode-steps", "2", "--repeats", "2", "--out", str(out)])
    assert len(result["passes"]) == 2 and out.exists()
    assert result["engine"].startswith(str(throughput.ROOT))
    assert all(p["output_tokens_per_s"] > 0 for p in result["passes"])


def test_older_trees_knob_names():
    """A tree whose EngineConfig names the decode steps `decode_steps` and has no `precompile`."""
    import dataclasses

    @dataclasses.dataclass
    class Old:
        model: str
        decode_steps: int = 4

    assert throughput.engine_config(Old, model="m", num_continuous_decode_steps=8) == \
        Old(model="m", decode_steps=8)
