"""hybridkv server: an OpenAI-compatible HTTP API over the hybrid static / paged KV cache.

    python serve.py                                  # smollm2-135m-instruct if installed, else
                                                     # the embedded tiny-random model (noise text)
    python serve.py --model /path/to/hf-checkpoint --port 30000
    python serve.py --prompt "Hello"                 # generate for the prompt and exit

Every flag is parsed here, before JAX starts its backend.
"""

import argparse
import ctypes
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import typing

from engine import envs, limits
from engine.config import EngineConfig  # importing JAX does not start its backend
from kvcache.elastic import use_returning_allocator
from models.packaged import default_model

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_flags(p.add_argument_group("model and KV cache (engine.config.EngineConfig)"))
    m = p.add_argument_group("model name")
    m.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--api-key", default=envs.API_KEY,
                   help="require 'Authorization: Bearer <key>' on every route but /health "
                        "(default: $HYBRIDKV_API_KEY; unset: no key)")
    s.add_argument("--max-request-bytes", type=int, default=limits.MAX_REQUEST_BYTES,
                   help="larger request bodies get a 413")
    s.add_argument("--max-engine-restarts", type=int, default=3,
                   help="if the engine's process dies, it is restarted (1 s back-off, doubling "
                        "while starts fail) at most this many times in 10 minutes; past that "
                        "the server exits with status 1")
    s.add_argument("--skip-warmup", action="store_true",
                   help="the same as --precompile none: each step shape compiles when a "
                        "launch first needs it (a log line each)")
    s.add_argument("--compilation-cache-dir",
                   default=os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/hybridkv/jax"),
                   help="JAX's persistent compilation cache, so that a restart loads the "
                        "compiled steps instead of compiling them again ('' turns it off)")
    g = p.add_argument_group("generate and exit (instead of serving)")
    g.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def add_engine_flags(group) -> None:
    """A flag per EngineConfig field: --max-running-requests for max_running_requests, with the
    field's default, choices and help. One exception: --model defaults to a real model when
    one is installed (models.packaged.default_model); EngineConfig and LLM() keep the
    embedded tiny-random, which the tests use."""
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
        default = default_model() if f.name == "model" else f.default
        group.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"],
                           help=f.metadata["help"])


def engine_config(args) -> EngineConfig:
    knobs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if args.skip_warmup:
        knobs["precompile"] = "none"
    return EngineConfig(**knobs)


def generate(args) -> int:
    from engine import LLM, SamplingParams  # imports JAX: after the flags are read

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    config = engine_config(args)
    if config.precompile == "auto":   # one batch, then exit: compile only the shapes it meets
        config = dataclasses.replace(config, precompile="none")
    llm = LLM.from_config(config)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": x}] for x in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "layout": out.layout}))
        else:
            print(f"{prompt!r} -> {out.text!r}  [{len(out.token_ids)} tokens, {out.layout}, "
                  f"{out.finish_reason}]")
    return 0


def start_engine(args):
    """The Engine the server drives, built and warmed up in its own process
    (server.worker), which sets itself up as `python serve.py --prompt` does."""
    from engine import Engine

    setup_process(args)
    log = logging.getLogger("hybridkv")
    engine = Engine(engine_config(args))
    start = time.perf_counter()
    n = engine.warmup()
    log.info("%d step programs compiled in %.1f s (--precompile %s); %d more compiling while "
             "serving", n, time.perf_counter() - start, engine.runner.programs.mode,
             engine.runner.programs.pending())
    return engine


def serve(args) -> int:
    """Serves until interrupted: 0, or 1 if the engine's process kept dying and the server
    gave up restarting it (server.bridge)."""
    import uvicorn

    from server import AsyncEngine, Metrics, build_app

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    server: uvicorn.Server | None = None

    def give_up():
        if server is not None:
            server.should_exit = True

    engine = AsyncEngine(functools.partial(start_engine, args), Metrics(),
                         max_restarts=args.max_engine_restarts, on_give_up=give_up)
    engine.start()
    app = build_app(engine, args.served_model_name or args.model, api_key=args.api_key,
                    max_request_bytes=args.max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.log_level))
    try:
        server.run()
    finally:
        engine.shutdown()
    return 1 if engine.gave_up else 0


def return_freed_host_memory(threshold: int = 1 << 20) -> bool:
    """Makes glibc's malloc serve blocks of `threshold` bytes or more with mmap, always, so that
    freeing one gives it back to the system. By default glibc raises that threshold to the size
    of each large block freed (up to 32 MiB); after that, blocks of the size XLA's CPU runtime
    allocates for each call's buffers come from malloc's per-thread arenas, which keep them: a
    CPU server's resident memory then grew in steps of such a buffer (28 MiB for the test
    server's steps) for as long as new threads or overlaps met them (a probe with 6 threads
    calling a jitted function with a 28 MiB output: resident memory held 255 -> 311 MiB with the
    default, back to 87 MiB after each round with this). Returns False where libc has no mallopt
    (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    m_mmap_threshold = -3
    return bool(mallopt and mallopt(m_mmap_threshold, threshold) == 1)


def setup_process(args) -> None:
    """What the process that runs JAX needs before its backend starts: glibc's malloc set to
    give memory back, the allocator an elastic pool needs, the compilation cache, logging."""
    return_freed_host_memory()
    if args.kv_pool == "elastic":
        use_returning_allocator()      # before JAX starts its backend
    if args.compilation_cache_dir:
        from engine.engine import use_compilation_cache
        use_compilation_cache(args.compilation_cache_dir)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    # JAX's note that it found no TPU, on every GPU or CPU start: not news at the default level.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.prompt:
            setup_process(args)
            return generate(args)
        return serve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
