"""bench/serving.py: its datasets, and one run against a fake streaming server on loopback."""

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse
from helpers import bench_module

serving = bench_module("serving")


def args_for(*flags):
    return serving.parse_args(["--disable-tqdm", *flags])


GSP = ["--dataset", "generated-shared-prefix", "--gsp-num-groups", "3", "--gsp-prompts-per-group",
       "4", "--gsp-system-prompt-len", "40", "--gsp-question-len", "7", "--gsp-output-len", "5"]


@pytest.mark.parametrize("flags", [
    ["--dataset", "random", "--random-input-len", "50", "--random-output-len", "9",
     "--random-range-ratio", "0.5"],
    ["--dataset", "sharegpt-like"],
    GSP,
])
def test_datasets_are_seeded_and_within_bounds(flags):
    a = serving.make_dataset(args_for(*flags, "--seed", "3"))
    assert a == serving.make_dataset(args_for(*flags, "--seed", "3"))
    assert a != serving.make_dataset(args_for(*flags, "--seed", "4"))
    tokens = [t for r in a for t in r.prompt]
    assert min(tokens) >= serving.FIRST_TOKEN_ID and max(tokens) < 256
    prompt_lens, output_lens = [len(r.prompt) for r in a], [r.output_len for r in a]
    if "random" in flags:
        assert len(a) == 200 and all(25 <= n <= 50 for n in prompt_lens)
        assert all(4 <= n <= 9 for n in output_lens) and len(set(prompt_lens)) > 1
    elif "sharegpt-like" in flags:
        assert all(4 <= n <= 1024 for n in prompt_lens) and all(1 <= n <= 512 for n in output_lens)
        assert 150 < sorted(prompt_lens)[100] < 260 and 110 < sorted(output_lens)[100] < 200
    else:
        assert len(a) == 12 and set(prompt_lens) == {47} and set(output_lens) == {5}


def test_shared_prefix_groups_share_exactly_their_system_prompt():
    requests = serving.make_dataset(args_for(*GSP))
    systems = [tuple(r.prompt[:40]) for r in requests]
    assert sorted(systems.count(s) for s in set(systems)) == [4, 4, 4]
    assert len({tuple(r.prompt[40:]) for r in requests}) == 12          # questions all differ
    assert systems[:4] != [systems[0]] * 4                               # groups interleave


def test_optimum_hit_rate_counts_whole_pages_of_the_shared_prompt():
    # 3 groups x 4 prompts of 40 + 7 tokens, pages of 16: the first prompt of each group hits
    # nothing, the other 3 hit the system prompt's 2 whole pages (32 of its 40 tokens).
    summary = serving.summarize_dataset(serving.make_dataset(args_for(*GSP)), args_for(*GSP))
    assert summary["optimum_cached_tokens"] == 3 * 3 * 32
    assert summary["optimum_hit_rate"] == pytest.approx(288 / (12 * 47))
    with pytest.raises(SystemExit):                          # the group sizes set the count
        args_for(*GSP, "--num-prompts", "5")
    # A repeated page-aligned prompt keeps its last page to compute; a random dataset hits nothing.
    R = serving.Request
    assert serving.optimum_cached_tokens([R([5] * 32, 1), R([5] * 32, 1)], 16) == 16
    assert serving.optimum_cached_tokens([R([5] * 32, 1), R([5] * 16 + [6] * 17, 1)], 16) == 16
    assert serving.optimum_cached_tokens(serving.make_dataset(args_for()), 16) == 0


def fake_server(with_metrics: bool) -> FastAPI:
    """Streams max_tokens token ids in chunks of 1, 2, 1, 2, ...; reports half of each prompt
    (rounded down) as cached; /metrics counts the same when enabled, and engine timing counters
    of one model step per chunk: 4 ms of engine time, 3 of them on the device."""
    app, counters = FastAPI(), {"hit": 0, "prompt": 0, "steps": 0}
    app.state.logprobs = set()          # the logprobs fields the requests carried

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake-model"}]}

    @app.get("/metrics")
    async def metrics():
        if not with_metrics:
            return PlainTextResponse("not here", status_code=404)
        return PlainTextResponse(
            "# TYPE hybridkv_prefix_cache_hit_tokens_total counter\n"
            f"hybridkv_prefix_cache_hit_tokens_total{{model=\"fake\"}} {counters['hit']}.0\n"
            f"hybridkv_prompt_tokens_total {counters['prompt']}.0\n"
            f"hybridkv_engine_step_seconds_total {counters['steps'] * 0.004}\n"
            f"hybridkv_engine_device_busy_seconds_total {counters['steps'] * 0.003}\n"
            f"hybridkv_device_steps_total {counters['steps']}.0\n"
            "hybridkv_xla_compiles_total 3.0\n")

    @app.post("/v1/completions")
    async def completions(body: dict):
        prompt, n = body["prompt"], body["max_tokens"]
        assert body["stream"] and body["ignore_eos"] and body["model"] == "fake-model"
        app.state.logprobs.add(body.get("logprobs"))
        counters["hit"] += len(prompt) // 2
        counters["prompt"] += len(prompt)

        def event(payload):
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            sent, size = 0, 1
            while sent < n:
                ids = list(range(sent, min(sent + size, n)))
                finish = "length" if ids[-1] == n - 1 else None
                counters["steps"] += 1
                yield event({"choices": [{"index": 0, "text": "x" * len(ids), "token_ids": ids,
                                          "finish_reason": finish}]})
                sent, size = sent + len(ids), 3 - size
                await asyncio.sleep(0.001)
            yield event({"choices": [], "usage": {
                "prompt_tokens": len(prompt), "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": len(prompt) // 2}}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@pytest.fixture(params=[True, False], ids=["with-metrics", "no-metrics"])
def server_url(request):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = fake_server(request.param)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", request.param, app
    server.should_exit = True
    thread.join(5)
    sock.close()


def test_run_against_fake_server_adds_up(server_url, tmp_path):
    url, with_metrics, app = server_url
    out = tmp_path / "report.json"
    logprobs = ["--logprobs", "5"] if with_metrics else []
    report = serving.main(["--disable-tqdm", "--base-url", url, *GSP, "--gsp-output-len", "6",
                           "--request-rate", "200", "--max-concurrency", "4",
                           "--output-file", str(out), *logprobs])
    assert app.state.logprobs == ({5} if with_metrics else {None})
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    requests = serving.make_dataset(args_for(*GSP))
    m = report["metrics"]
    assert report["model"] == "fake-model" and set(report) >= {"args", "dataset", "metrics"}
    assert m["completed"] == 12 and m["failed"] == 0 and m["errors"] == []
    assert m["total_output_tokens"] == m["streamed_output_tokens"] == 12 * 6
    assert m["shorter_than_requested"] == 0
    assert m["total_input_tokens"] == sum(len(r.prompt) for r in requests)
    expected_hit = sum(len(r.prompt) // 2 for r in requests) / m["total_input_tokens"]
    assert m["prefix_hit_rate"] == pytest.approx(expected_hit)
    assert m["hit_rate_vs_optimum"] == pytest.approx(expected_hit / m["optimum_hit_rate"])
    assert m["server_hit_rate"] == (pytest.approx(expected_hit) if with_metrics else None)
    assert m["server_host_fraction"] == (pytest.approx(0.25) if with_metrics else None)
    assert m["server_ms_per_step"] == (pytest.approx(4.0) if with_metrics else None)
    assert m["server_compiles"] == (0 if with_metrics else None)
    assert m["tokens_per_chunk"] == {"mean": 1.5, "max": 2}             # 6 tokens as 1,2,1,2
    assert 0 < m["ttft_ms"]["p50"] <= m["e2e_ms"]["p50"] and m["itl_ms"]["mean"] > 0
    assert m["mean_concurrency"] <= 4 + 1e-6
    assert m["request_throughput"] == pytest.approx(12 / m["duration_s"])


def test_steady_window_scrapes_at_full_batch_and_at_the_first_end(monkeypatch):
    """Two scrapes: when the third of three requests has its first token, and when the first
    one ends; never again after."""
    seen, scrapes = [], [(10.0, 8.0, 100.0), (12.0, 9.9, 500.0)]   # wall, busy, steps

    async def scrape(client, url):
        seen.append(window.decoding)
        return dict(zip(serving.TIMING_COUNTERS, scrapes[len(seen) - 1]))

    async def load():
        for event in ["first_token"] * 3 + ["ended"] * 3 + ["first_token", "ended"]:
            getattr(window, event)()
            await asyncio.sleep(0)
        return await window.counters()

    monkeypatch.setattr(serving, "scrape_counters", scrape)
    window = serving.SteadyWindow(None, "http://x", full=3)
    before, after = asyncio.run(load())
    assert seen == [3, 2]
    # 2 s of engine time over 400 steps, 0.1 s of it not on the device.
    assert serving.engine_timing(before, after) == {
        "host_fraction": pytest.approx(0.05), "host_ms_per_step": pytest.approx(0.25),
        "ms_per_step": pytest.approx(5.0), "steps": 400.0}


def test_steady_window_that_never_forms_reports_none():
    async def load():
        window = serving.SteadyWindow(None, "http://x", full=2)
        window.first_token()
        window.ended()
        return await window.counters()
    assert asyncio.run(load()) == (None, None)
    assert serving.engine_timing(None, None)["host_fraction"] is None


def test_unreachable_server_counts_failures():
    with socket.socket() as sock:                      # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    args = args_for("--base-url", url, "--model", "m", "--num-prompts", "3",
                    "--random-input-len", "8", "--random-output-len", "2", "--warmup-requests", "0")
    m = asyncio.run(serving.run_benchmark(args))["metrics"]
    assert m["completed"] == 0 and m["failed"] == 3 and "ConnectError" in m["errors"][0]
    assert m["prefix_hit_rate"] is None and m["ttft_ms"]["p50"] is None
    with pytest.raises(SystemExit, match="warmup request failed"):
        asyncio.run(serving.run_benchmark(args_for("--base-url", url, "--model", "m",
                                                   "--num-prompts", "1")))
