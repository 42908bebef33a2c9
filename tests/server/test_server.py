"""serve.py as users run it: a subprocess on a free loopback port, driven by the official
`openai` client and by httpx. After every test the pool is clean: every page is free or held by
the prefix cache, and no request is left running or queued."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).parent.parent.parent
MODEL = "tiny-random"
CONTEXT, POOL_TOKENS = 2048, 1024
FLAGS = ["--model", MODEL, "--dtype", "float32", "--page-size", "4", "--context-length", str(CONTEXT),
         "--max-total-tokens", str(POOL_TOKENS), "--max-running-requests", "16",
         "--static-max-tokens", "64", "--chunked-prefill-size", "64", "--log-level", "warning"]

# Start-up with --precompile all compiles every step shape first: healthy after 68 s on a 2-core
# CPU, 196 s on the H100 (jax 0.11.2, before the shapes were cut to about a third).
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Every step program before ready, as on a GPU with --precompile all (a CPU defaults to
    # none): the rounds below then compile nothing.
    yield from start_server(tmp_path_factory, [*FLAGS, "--precompile", "all"])


def start_server(tmp_path_factory, flags):
    """serve.py with flags on a free port, once healthy: yields (url, process, log path)."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("server")
    log = tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port),
                             "--compilation-cache-dir", str(tmp / "jax-cache"), *flags],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve.py did not become healthy in {START_TIMEOUT_S} s:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, proc, log
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def url(server):
    yield server[0]
    wait_idle(server[0])


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def metrics(url) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(r"^(hybridkv_\w+) (\S+)$", text, re.M)}


def wait_idle(url, timeout=30.0) -> dict:
    """Waits until nothing runs or waits, then checks that only the prefix cache holds pages."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["hybridkv_running_requests"] == 0 and m["hybridkv_queued_requests"] == 0:
            break
        assert time.monotonic() < deadline, f"requests still live: {m}"
        time.sleep(0.1)
    assert m["hybridkv_pages_used"] == m["hybridkv_pages_cached"], m
    return m


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completions_streamed_and_not(client):
    full = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=12,
                                     **GREEDY)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of", max_tokens=12,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == full.choices[0].model_extra["token_ids"]


def test_token_id_prompts_batches_and_n(client):
    out = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2,
                                    **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    ids = [c.model_extra["token_ids"] for c in out.choices]
    assert ids[0] == ids[1] and ids[2] == ids[3]  # greedy: n copies agree
    assert out.usage.prompt_tokens == 2 * (3 + 2) and out.usage.completion_tokens == 12


def test_chat_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                          **GREEDY)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(client):
    text = client.completions.create(model=MODEL, prompt="abc", max_tokens=24,
                                     **GREEDY).choices[0].text
    stop = next(ch for ch in text[3:] if ch.isprintable() and ch != "\ufffd")
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=24, stop=[stop],
                                    **GREEDY).choices[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]


def test_models_health_and_native_generate(url):
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    prompt = list(range(10, 90))   # 80 tokens: longer than --static-max-tokens, so paged
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0,
                                                     "ignore_eos": True}}
    first = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    again = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert first["output_ids"] == again["output_ids"] and len(first["output_ids"]) == 5
    assert first["meta_info"]["layout"] == "paged"
    assert again["meta_info"]["cached_tokens"] == 76   # whole pages, one token left to feed
    text = httpx.post(f"{url}/generate", json={"text": "hello", "sampling_params": {
        "max_new_tokens": 2, "ignore_eos": True}}, timeout=60).json()
    assert text["meta_info"]["layout"] == "static" and len(text["output_ids"]) == 2


def test_concurrent_clients_match_sequential_results(url, client):
    """32 clients at once, mixed lengths (static and paged), greedy: the same tokens as one at a
    time."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(3 + (i * 37) % 150)] for i in range(32)]
    lengths = [4 + (i * 5) % 13 for i in range(32)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY)
             .choices[0].model_extra["token_ids"] for p, n in zip(prompts[:6], lengths)]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none",
                                      max_retries=0) as aclient:
            outs = await asyncio.gather(*[
                aclient.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY)
                for p, n in zip(prompts, lengths)])
        return [o.choices[0].model_extra["token_ids"] for o in outs]

    outs = asyncio.run(together())
    assert [len(o) for o in outs] == lengths
    assert outs[:6] == alone
    m = wait_idle(url)
    assert m["hybridkv_prefix_cache_hit_tokens_total"] > 0


BAD = [  # (endpoint, body or raw bytes, field named in the error)
    ("completions", b"{bad json", None),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": [5] * (CONTEXT + 10)}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": CONTEXT}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ("completions", {"model": "gpt-9", "prompt": "x"}, "model"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 100}, "n"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("completions", b'{"model": "tiny-random", "prompt": "\xff\xfe"}', None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": POOL_TOKENS + 10},
     "max_tokens"),
]


@pytest.mark.parametrize("endpoint, body, param", BAD, ids=[
    "malformed-json", "missing-prompt", "mistyped-max-tokens", "prompt-beyond-context",
    "max-tokens-zero", "max-tokens-beyond-context", "negative-temperature", "top-p-zero",
    "top-p-above-one", "unknown-model", "n-beyond-limit", "empty-messages", "invalid-utf8",
    "never-fits-the-pool"])
def test_bad_input_gets_a_400_naming_the_field(url, client, endpoint, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/{endpoint}", headers={"content-type": "application/json"},
                   timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    if param == "max_tokens" and body.get("max_tokens") == POOL_TOKENS + 10:
        assert f"{POOL_TOKENS // 4} pages" in err["message"]        # the pool's numbers
    # The server keeps serving.
    out = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, **GREEDY)
    assert out.usage.completion_tokens == 2


def test_client_disconnect_frees_its_pages(url):
    body = {"model": MODEL, "prompt": list(range(3, 120)), "max_tokens": 800, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metrics(url)["hybridkv_running_requests"] == 1
    wait_idle(url, timeout=10)


def test_flush_cache_refuses_while_requests_run(url):
    body = {"model": MODEL, "prompt": [3, 4, 5], "max_tokens": 1000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()    # kept open: a closed iterator closes the connection
        assert next(line for line in lines if line.startswith("data:"))
        refused = httpx.post(f"{url}/flush_cache")
        assert refused.status_code == 409 and "running" in refused.json()["error"]["message"]
    wait_idle(url)
    assert httpx.post(f"{url}/flush_cache").json() == {"flushed": True}
    assert metrics(url)["hybridkv_pages_used"] == 0


def test_metrics_are_exposed(url, client):
    client.completions.create(model=MODEL, prompt="hi", max_tokens=3, **GREEDY)
    m = metrics(url)
    for name in ("pages_used", "pages_free", "kv_usage_ratio", "prefix_cache_hit_rate",
                 "preemptions_total", "running_requests", "queued_requests",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count"):
        assert f"hybridkv_{name}" in m, name
    assert m["hybridkv_pages_used"] + m["hybridkv_pages_free"] == POOL_TOKENS // 4


def resident_kib(pid: int) -> dict[str, int]:
    """The process's resident memory by kind (KiB): RssAnon is what a leak grows; RssFile
    (pages of mapped files, such as jaxlib's code, read in as new paths first run) and the
    total are reported alongside."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"(VmRSS|RssAnon|RssFile):\s+(\d+) kB", status)}


def engine_pid(pid: int) -> int:
    """The engine's process (server.worker): the server's child started by
    multiprocessing's spawn (beside it, multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    engines = [int(c) for c in children
               if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, children
    return engines[0]


def test_soak_no_page_leak_and_flat_memory(server):
    """Rounds of 60 short requests, 16 at a time: every page comes back after each round, and
    once a round compiles nothing (the step shapes were compiled at start-up, but page
    operations compile lazily, per bucket, and which buckets a round meets depends on timing),
    that round leaves the anonymous resident memory of both the server's process and the
    engine's flat. (The engine's process has glibc give large freed blocks back: see
    serve.return_freed_host_memory.)"""
    url, proc, _ = server
    pids = {"server": proc.pid, "engine": engine_pid(proc.pid)}

    async def round_(seed: int):
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        gate = asyncio.Semaphore(16)

        async def one(i):
            async with gate:
                prompt = [(seed * 31 + i * 7 + j) % 250 + 3 for j in range(1 + (i * 13) % 40)]
                out = await aclient.completions.create(model=MODEL, prompt=prompt,
                                                       max_tokens=1 + i % 6, temperature=0.7,
                                                       seed=i, stream=i % 2 == 0)
                if i % 2 == 0:
                    async for _ in out:
                        pass
        async with aclient:
            await asyncio.gather(*[one(i) for i in range(60)])

    rss, compiles = [], []
    for seed in range(8):
        asyncio.run(round_(seed))
        m = wait_idle(url)
        rss.append({name: resident_kib(pid) for name, pid in pids.items()})
        compiles.append(m["hybridkv_xla_compiles_total"])
        if seed >= 4 and compiles[-1] == compiles[-2]:
            break
    assert compiles[-1] == compiles[-2], f"every round compiled something: {compiles}"
    for name in pids:
        growth = (rss[-1][name]["RssAnon"] - rss[-2][name]["RssAnon"]) / rss[-2][name]["RssAnon"]
        assert growth < 0.01, f"the {name} process's anonymous resident memory grew " \
            f"{growth:.1%} over a round that compiled nothing: {rss} KiB, XLA compiles {compiles}"


def test_server_warmed_up_every_step_shape_at_start(server):
    """--precompile all compiles the bounded step-shape set behind a progress bar."""
    text = server[2].read_text()
    assert re.search(r"compiling step shapes: 100%.* (\d+)/\1 ", text), text[-4000:]


def test_server_log_has_no_tracebacks(server):
    """Everything above, bad input and disconnects included, left no exception in the log."""
    url, proc, log = server
    assert proc.poll() is None and httpx.get(f"{url}/health").status_code == 200
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


@pytest.fixture(scope="module")
def elastic_server(tmp_path_factory):
    flags = [*FLAGS, "--kv-pool", "elastic", "--kv-pool-min-tokens", "256",
             "--kv-shrink-after", "0.5", "--skip-warmup"]
    yield from start_server(tmp_path_factory, flags)


def test_elastic_pool_grows_under_load_and_shrinks_when_idle(elastic_server):
    """64 pages at start-up; 6 concurrent requests make it grow; half a second after the last
    one ends it is back to 64 pages. A request that can never fit is refused with the numbers."""
    url, proc, log = elastic_server
    m = metrics(url)
    assert m["hybridkv_pool_pages"] == 64 and m["hybridkv_pool_max_pages"] == POOL_TOKENS // 4

    async def burst():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none",
                                      max_retries=0) as aclient:
            outs = await asyncio.gather(*[aclient.completions.create(
                model=MODEL, prompt=[3 + i] * (100 + 9 * i), max_tokens=24, **GREEDY)
                for i in range(6)])
        return [len(o.choices[0].token_ids) for o in outs]
    assert asyncio.run(burst()) == [24] * 6
    m = wait_idle(url)
    assert m["hybridkv_pool_grows_total"] > 0
    deadline = time.monotonic() + 30
    while metrics(url)["hybridkv_pool_pages"] != 64:
        assert time.monotonic() < deadline, f"the pool did not shrink: {metrics(url)}"
        time.sleep(0.2)
    assert metrics(url)["hybridkv_pool_shrinks_total"] > 0
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [5] * 10,
                                                    "max_tokens": 1500})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "bytes" in r.json()["error"]["message"]
    assert proc.poll() is None and "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def host_tier_server(tmp_path_factory):
    flags = ["--dtype", "float32", "--page-size", "4", "--context-length", "256",
             "--max-total-tokens", "96", "--max-running-requests", "4", "--host-kv-size", "512",
             "--log-level", "warning"]
    yield from start_server(tmp_path_factory, flags)


def test_host_tier_serves_a_prefix_the_pool_evicted(host_tier_server):
    """A 24-page pool: prefix B's request pushes prefix A's 16 cached pages out to the host
    tier, and A's next request finds them there; /metrics counts the hit as the host's."""
    url, proc, log = host_tier_server
    a, b = list(range(3, 67)), list(range(100, 164))

    def generate(ids):
        r = httpx.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": {
            "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["meta_info"]

    assert generate(a + [1])["cached_tokens"] == 0
    assert generate(b + [1])["cached_tokens"] == 0
    meta = generate(a + [2])
    assert meta["cached_tokens"] == meta["host_cached_tokens"] == 64
    m = wait_idle(url)
    text = httpx.get(f"{url}/metrics").text
    tiers = dict(re.findall(r'^hybridkv_prefix_cache_tier_hit_tokens_total\{tier="(\w+)"\} (\S+)$',
                            text, re.M))
    assert float(tiers["host"]) == 64 and float(tiers["device"]) == 0, tiers
    assert m["hybridkv_host_pages_loaded_total"] == 16 and m["hybridkv_host_pool_pages"] == 128
    assert m["hybridkv_host_pages_cached"] > 0 and m["hybridkv_host_tier_bytes"] > 0
    assert proc.poll() is None and "Traceback" not in log.read_text()


@pytest.fixture
def lone_server(tmp_path_factory, request):
    yield from start_server(tmp_path_factory, [*FLAGS, "--skip-warmup", *request.param])


def wait_health(url, status: int, says: str = "", timeout: float = 120.0) -> httpx.Response:
    """/health once it answers `status` with `says` in its body."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/health")
        if r.status_code == status and says in r.text:
            return r
        assert time.monotonic() < deadline, f"/health stayed {r.status_code}: {r.text}"
        time.sleep(0.2)


@pytest.mark.parametrize("lone_server", [[]], indirect=True)
def test_a_killed_engine_is_reported_and_restarted(lone_server):
    """The engine runs in a process of its own: if it dies, the server's process stays up,
    /health turns 503 saying why, requests get a 503 JSON error at once (none waits forever),
    and the supervisor starts a new engine that serves again; /metrics counts the restart."""
    url, proc, _ = lone_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                      **GREEDY).choices[0].finish_reason == "length"
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 900, "stream": True,
            "ignore_eos": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(engine_pid(proc.pid), signal.SIGKILL)
        rest = [line for line in lines if line]   # it ends, with an error event: no hang
    assert any('"error"' in line and "SIGKILL" in line for line in rest), rest
    assert rest[-1] == "data: [DONE]"
    down = wait_health(url, 503, says="restarting", timeout=30).json()["error"]
    assert "killed by signal SIGKILL" in down["message"], down
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                  "max_tokens": 2})
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    wait_health(url, 200)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                      **GREEDY).usage.completion_tokens == 2
    assert metrics(url)["hybridkv_engine_restarts_total"] == 1
    assert proc.poll() is None


@pytest.mark.parametrize("lone_server", [["--max-engine-restarts", "0"]], indirect=True)
def test_past_its_restart_limit_the_server_exits_non_zero(lone_server):
    """With no restarts allowed, an engine that dies takes the server down with status 1, for
    a supervisor (systemd, Kubernetes) to restart."""
    url, proc, log = lone_server
    os.kill(engine_pid(proc.pid), signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    assert "gave up after 0 restart(s)" in log.read_text()
