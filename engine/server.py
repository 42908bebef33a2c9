"""The HTTP API: OpenAI-compatible completions and chat (streamed as SSE or not), SGLang's
native /generate, /v1/models, /health, /metrics (Prometheus) and /flush_cache.

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a bad
request gets a 400 naming the offending field in `param` (engine.limits has the table of
limits), a missing or wrong API key a 401, a body past --max-request-bytes a 413; the engine
keeps serving. A request that a device error failed gets a 500 naming the cause, and requests
made while the engine's process is down a 503 saying why (engine.async_engine restarts it). A
stream that fails after it began ends with an `error` event. A client that disconnects aborts
its requests, which frees their rows and pages at the next step.
"""

import asyncio
import json
import re
import secrets
import time
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import limits
from engine.async_engine import AsyncEngine, EngineUnavailable, RequestFailed
from engine.limits import InvalidRequest
from engine.protocol import ChatRequest, CompletionRequest, GenerateRequest
from engine.sampling import SamplingParams


def error(status: int, message: str, param: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


def _error_body(e: Exception) -> dict:
    status, kind = ((503, "service_unavailable") if isinstance(e, EngineUnavailable)
                    else (500, "server_error"))
    return {"error": {"message": str(e), "type": kind, "param": None, "code": status}}


class Guard:
    """ASGI middleware before every route: the API key (a `Authorization: Bearer <key>` header
    on every route but /health, as vLLM's --api-key asks) and the body size limit (413 past
    max_bytes, by Content-Length or, for a chunked body, as it arrives)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.key = None if not api_key else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health" and not secrets.compare_digest(
                headers.get(b"authorization", b""), self.key):
            return await error(401, "a valid API key is required: send the header "
                               "'Authorization: Bearer <key>'", None,
                               "authentication_error")(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await error(413, f"the body has {length.decode(errors='replace')} bytes; at "
                               f"most {self.max_bytes} are accepted (--max-request-bytes)", None,
                               )(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"the body is larger than {self.max_bytes} bytes "
                                         "(--max-request-bytes)")
            return message
        return await self.app(scope, limited, send)


# Pydantic names the member of a union a value failed in its error locations
# ("function-after[...]", "list[constrained-int]", "str"): the field is the rest.
_UNION_MEMBER = re.compile(r".*[\[\]-].*|str|int|float|bool|list|dict|none")


def _field(loc) -> str | None:
    return ".".join(str(x) for x in loc
                    if x != "body" and not _UNION_MEMBER.fullmatch(str(x))) or None


class TextStream:
    """Detokenizes a growing list of output tokens, incrementally: a push decodes only the
    tokens since the text last ended on a whole character, after the tokens before them (the
    context a tokenizer needs, e.g. to place a word's leading space), so it costs the new tokens,
    not the whole output. Holds back text that ends in a partial character or in what may be
    the start of a stop string (until `final`), and cuts the text at the first stop string.

    With a byte-fallback decoder (Llama-2, Mistral), a run of byte tokens that is not valid
    UTF-8 decodes to one U+FFFD per token as a whole, so pieces cut inside such a run can differ
    from the whole decode; valid text streams the same."""

    def __init__(self, tokenizer, stop_ids, stops: list[str]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, set(stop_ids), stops
        self.tokens: list[int] = []
        self.text = ""             # the decoded text so far, stop cut applied
        self.context = 0           # tokens[context:done] decode to the end of `text`
        self.done = 0
        self.sent = 0
        self.stopped = False

    def push(self, tokens, final: bool) -> str:
        """New text after tokens; `final` flushes a trailing partial character too."""
        self.tokens += [t for t in tokens if t not in self.stop_ids]
        if self.tokenizer is None or self.stopped:
            return ""
        before = self.tokenizer.decode(self.tokens[self.context:self.done])
        window = self.tokenizer.decode(self.tokens[self.context:])
        if (final or not window.endswith("\ufffd")) and window.startswith(before):
            start = len(self.text)
            self.text += window[len(before):]
            self.context, self.done = self.done, len(self.tokens)
            # A stop string that ends in the new text starts at most longest - 1 before it.
            cuts = [c for c in (self.text.find(s, max(start - len(s) + 1, 0))
                                for s in self.stops) if c >= 0]
            if cuts:
                self.text, self.stopped = self.text[:min(cuts)], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._stop_prefix()
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new

    def _stop_prefix(self) -> int:
        """Characters at the end of the text that may begin a stop string: held back until the
        next tokens show whether the stop string follows."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(engine: AsyncEngine, model_name: str, *, api_key: str | None = None,
              max_request_bytes: int = limits.MAX_REQUEST_BYTES) -> FastAPI:
    core = engine.front
    app = FastAPI(title="hybridkv", version="0.1")
    app.add_middleware(Guard, api_key=api_key, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        errors = exc.errors()
        # A value error says more than "not a list" from another member of a union.
        first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg')}", None)
        param = _field(first.get("loc", ()))
        return error(400, f"{param or 'body'}: {first.get('msg')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        # FastAPI's own 400 when a body cannot be read at all (e.g. it is not UTF-8).
        suffix = ": the body must be UTF-8 encoded JSON" if exc.status_code == 400 else ""
        return error(exc.status_code, f"{exc.detail}{suffix}", None)

    @app.exception_handler(EngineUnavailable)
    @app.exception_handler(RequestFailed)
    async def _engine_error(_, exc: Exception):
        body = _error_body(exc)
        return JSONResponse(body, status_code=body["error"]["code"])

    # -- helpers ----------------------------------------------------------------------------
    def sampling(body, max_tokens: int, n_index: int) -> SamplingParams:
        seed = body.seed          # choice j draws with seed + j; a bad seed is refused as is
        if seed is not None and 0 <= seed < limits.SEED_END:
            seed = (seed + n_index) % limits.SEED_END
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=seed,
                              stop_token_ids=tuple(body.stop_token_ids),
                              ignore_eos=body.ignore_eos)

    def check_model(name: str):
        if name != model_name:
            return error(400, f"model {name!r} is not served here; this server serves "
                              f"{model_name!r}", "model")
        return None

    def make_requests(prompts, body, max_tokens_of) -> list:
        return [core.make_request(f"req-{uuid.uuid4().hex}", prompt,
                                  sampling(body, max_tokens_of(prompt), j))
                for prompt in prompts for j in range(body.n)]

    async def updates(reqs, stops):
        """Yields (index, new text, new token ids, finish reason) as any request advances; a
        stop string ends its request early (finish reason "stop")."""
        streams = [TextStream(core.tokenizer, r.stop_ids, stops) for r in reqs]
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, req):
            try:
                async for update in engine.generate(req):
                    await merged.put((i, update))
                    if streams[i].stopped:
                        return
            except Exception as e:   # noqa: BLE001 - re-raised by the consumer
                await merged.put((i, e))
            finally:
                await merged.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            live = len(reqs)
            while live:
                i, update = await merged.get()
                if update is None:
                    live -= 1
                    continue
                if isinstance(update, Exception):
                    raise update
                if streams[i].stopped:
                    continue
                reason = update.finish_reason
                text = streams[i].push(update.tokens, final=reason is not None)
                if streams[i].stopped:
                    engine.abort(reqs[i].rid)
                    reason = "stop"
                if text or update.tokens or reason:
                    yield i, text, list(update.tokens), reason
        finally:
            for t in tasks:
                t.cancel()

    async def collect(reqs, http: Request, stops):
        """Non-streamed: every request's text and finish reason, or None if the client went
        away first (its requests are then aborted)."""
        texts, reasons = [""] * len(reqs), [None] * len(reqs)

        async def run():
            async for i, text, _, reason in updates(reqs, stops):
                texts[i] += text
                reasons[i] = reason or reasons[i]

        work = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(_wait_disconnect(http))
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return None
        watch.cancel()
        work.result()
        return texts, reasons

    def usage(reqs) -> dict:
        prompt = sum(len(r.prompt) for r in reqs)
        completion = sum(len(r.output) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)}}

    async def sse_stream(reqs, stops, chunk_of, include_usage: bool):
        try:
            async for i, text, tokens, reason in updates(reqs, stops):
                yield sse(chunk_of(i, text, tokens, reason))
        except (EngineUnavailable, RequestFailed) as e:   # the stream began with a 200
            yield sse(_error_body(e))
        else:
            if include_usage:
                yield sse(chunk_of(None, "", [], None) | {"choices": [], "usage": usage(reqs)})
        yield "data: [DONE]\n\n"

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    async def respond(body, reqs, http: Request, chunk_of, whole):
        """SSE chunks when body.stream, else whole(texts, reasons) once every request ended
        (499 if the client left first)."""
        if body.stream:
            return StreamingResponse(sse_stream(reqs, body.stop, chunk_of, include_usage(body)),
                                     media_type="text/event-stream")
        result = await collect(reqs, http, body.stop)
        return Response(status_code=499) if result is None else whole(*result)

    def engine_down():
        if engine.alive:
            return None
        return error(503, f"the engine is not running: {engine.error or 'its process ended'}",
                     None, "service_unavailable")

    # -- OpenAI ------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        if (bad := check_model(body.model)) is not None:
            return bad
        try:
            reqs = make_requests(body.prompt, body, lambda _: body.max_tokens)
        except InvalidRequest as e:
            return error(400, str(e), e.param)
        if (bad := engine_down()) is not None:
            return bad
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, tokens, reason):
            choices = [] if i is None else [{"index": i, "text": text, "token_ids": tokens,
                                             "logprobs": None, "finish_reason": reason}]
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": model_name, "choices": choices}

        def whole(texts, reasons):
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": model_name,
                    "choices": [{"index": i, "text": t, "token_ids": r.output, "logprobs": None,
                                 "finish_reason": reason}
                                for i, (t, r, reason) in enumerate(zip(texts, reqs, reasons))],
                    "usage": usage(reqs)}

        return await respond(body, reqs, http, chunk, whole)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        if (bad := check_model(body.model)) is not None:
            return bad
        if core.tokenizer is None:
            return error(400, "this model has no tokenizer, so no chat template", "messages")
        try:
            text = core.tokenizer.apply_chat_template(
                [m.model_dump() for m in body.messages])
            ids = core.tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:   # noqa: BLE001 - a template error is the client's input
            return error(400, f"the chat template failed on these messages: {e}", "messages")
        named = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, named)
        try:
            reqs = make_requests([ids], body, lambda p: core.default_max_tokens(len(p))
                                 if max_tokens is None else max_tokens)
        except InvalidRequest as e:
            return error(400, str(e), {"prompt": "messages", "max_tokens": named}.get(e.param,
                                                                                     e.param))
        if (bad := engine_down()) is not None:
            return bad
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        opened = set()

        def chunk(i, text, tokens, reason):
            if i is None:
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": model_name}
            delta = {"content": text}
            if i not in opened:
                opened.add(i)
                delta["role"] = "assistant"
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model_name,
                    "choices": [{"index": i, "delta": delta, "token_ids": tokens,
                                 "logprobs": None, "finish_reason": reason}]}

        def whole(texts, reasons):
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                                 "logprobs": None, "finish_reason": reason}
                                for i, (t, reason) in enumerate(zip(texts, reasons))],
                    "usage": usage(reqs)}

        return await respond(body, reqs, http, chunk, whole)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "hybridkv",
            "max_model_len": core.context_length}]}

    # -- native ------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(body: GenerateRequest, http: Request):
        if (body.text is None) == (body.input_ids is None):
            return error(400, "give exactly one of text and input_ids", "text")
        sp = body.sampling_params
        stops = sp.stop
        prompt = body.text if body.text is not None else body.input_ids
        try:
            params = SamplingParams(max_tokens=sp.max_new_tokens, temperature=sp.temperature,
                                    top_p=sp.top_p, top_k=sp.top_k, seed=sp.seed,
                                    stop_token_ids=tuple(sp.stop_token_ids),
                                    ignore_eos=sp.ignore_eos)
            req = core.make_request(f"gen-{uuid.uuid4().hex}", prompt, params)
        except InvalidRequest as e:
            param = {"prompt": "text" if body.text is not None else "input_ids",
                     "max_tokens": "sampling_params.max_new_tokens"}.get(
                         e.param, f"sampling_params.{e.param}")
            return error(400, str(e), param)
        if (bad := engine_down()) is not None:
            return bad

        def result(text, reason):
            return {"text": text, "output_ids": list(req.output), "meta_info": {
                "id": req.rid, "prompt_tokens": len(req.prompt),
                "completion_tokens": len(req.output), "cached_tokens": req.cached_tokens,
                "host_cached_tokens": req.host_cached_tokens,
                "layout": req.layout, "finish_reason": reason}}

        if body.stream:
            async def events():
                text = ""
                try:
                    async for _, new, _, reason in updates([req], stops):
                        text += new
                        yield sse(result(text, reason))
                except (EngineUnavailable, RequestFailed) as e:
                    yield sse(_error_body(e))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        out = await collect([req], http, stops)
        if out is None:
            return Response(status_code=499)
        return result(out[0][0], out[1][0])

    @app.get("/health")
    async def health():
        return engine_down() or {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/flush_cache")
    async def flush_cache():
        if not await engine.call("flush_cache"):
            return error(409, "requests are queued or running; flush the cache when idle", None,
                         "conflict")
        return {"flushed": True}

    return app


async def _wait_disconnect(http: Request) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
