"""bench/window_kv.py's bytes for the Gemma-3-4B shape against the count by hand: 34 layers, 29
of them local (window 1024), 4 KV heads of 256, bfloat16 (4 KiB a token a layer)."""

import json

from helpers import bench_module

window_kv = bench_module("window_kv")


def test_window_kv_bench_counts_the_rings(tmp_path):
    out = tmp_path / "window-kv.json"
    window_kv.main(["--contexts", "32768", "--chunks", "512", "16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    token_layer = 2 * 4 * 256 * 2
    # scratch: one chunk of 512 (33 pages) or 4 of 128 (9 pages each); one of 16 or 4 of 4
    for row, scratch in zip(rows, (36, 8)):
        assert row["ring_pages"] == 65 and row["ring_layers"] == 29    # ceil(1023 / 16) + 1
        assert row["full_bytes"] == 34 * 32768 * token_layer
        assert row["window_bytes"] == (5 * 32768 + 29 * 65 * 16) * token_layer
        assert row["scratch_bytes_shared"] == 29 * scratch * 16 * token_layer
        assert row["ratio"] == 5.74
