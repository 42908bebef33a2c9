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
    for row, ring in zip(rows, (97, 66)):      # ceil((1024 + chunk - 1) / 16) + 1
        assert row["ring_pages"] == ring and row["ring_layers"] == 29
        assert row["full_bytes"] == 34 * 32768 * token_layer
        assert row["window_bytes"] == (5 * 32768 + 29 * ring * 16) * token_layer
    assert [row["ratio"] for row in rows] == [5.33, 5.73]
