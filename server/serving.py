"""What every route shares: the engine, the model name it serves under, and turning a body into
requests and their updates into text, SSE chunks or one response."""

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from engine import limits
from engine.front import Front
from engine.limits import InvalidRequest
from engine.sampling import SamplingParams
from server.bridge import AsyncEngine, EngineUnavailable, RequestFailed
from server.errors import ApiError, engine_error_body
from server.text_stream import TextStream


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(reqs, prompt_only: bool = False) -> dict:
    """OpenAI's usage of reqs (prompt_only: their tokens drawn only to read the prompt's log
    probabilities are not counted)."""
    prompt = sum(len(r.prompt) for r in reqs)
    completion = 0 if prompt_only else sum(len(r.output) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)}}


def sampling_params(body, max_tokens, min_tokens: int, n_index: int = 0,
                    logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """A body's sampling fields (OpenAI's or /generate's sampling_params; max_tokens and
    min_tokens come apart, as each API names them; its structured output from its `guided()`)
    for its choice n_index, which draws with seed + n_index; logprobs / prompt_logprobs: most
    likely tokens to return with each sampled / prompt token (None: no log probabilities)."""
    seed = body.seed                  # a seed out of range is refused as it came
    if seed is not None and 0 <= seed < limits.SEED_END:
        seed = (seed + n_index) % limits.SEED_END
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=seed,
                          stop_token_ids=tuple(body.stop_token_ids), ignore_eos=body.ignore_eos,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          logit_bias=body.logit_bias or {},
                          min_tokens=min_tokens, presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty, **body.guided())


@dataclasses.dataclass
class Serving:
    engine: AsyncEngine
    model_name: str

    @property
    def front(self) -> Front:
        return self.engine.front

    # -- checks (each raises ApiError) -----------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(400, f"model {name!r} is not served here; this server serves "
                                f"{self.model_name!r}", "model")

    def check_up(self) -> None:
        if not self.engine.alive:
            raise ApiError(503, f"the engine is not running: "
                                f"{self.engine.error or 'its process ended'}",
                           None, "service_unavailable")

    async def make_requests(self, prompts, params_of: Callable, n: int = 1,
                            params: dict | None = None) -> list:
        """n requests per prompt, params_of(prompt, j) giving choice j's SamplingParams. An
        InvalidRequest becomes a 400 whose param is renamed by `params` (the request field
        name differs per endpoint). Built in a worker thread: tokenizing a long prompt and
        compiling a grammar (engine.guided) take long and release the GIL, and the event loop
        goes on serving meanwhile."""
        def make():
            return [self.front.make_request(f"req-{uuid.uuid4().hex}", prompt,
                                            params_of(prompt, j))
                    for prompt in prompts for j in range(n)]
        try:
            return await asyncio.to_thread(make)
        except InvalidRequest as e:
            raise ApiError(400, str(e), (params or {}).get(e.param, e.param)) from None

    # -- results --------------------------------------------------------------------------------
    async def updates(self, reqs, stops) -> AsyncIterator[tuple]:
        """Yields (index, new text, new token ids, their logprobs or None, finish reason) as
        any request advances; a stop string ends its request early (finish reason "stop")."""
        streams = [TextStream(self.front.tokenizer, r.stop_ids, stops) for r in reqs]
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, req):
            try:
                async for update in self.engine.generate(req):
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
                    self.engine.abort(reqs[i].rid)
                    reason = "stop"
                if text or update.tokens or reason:
                    yield i, text, list(update.tokens), update.logprobs, reason
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, reqs, http: Request, stops):
        """Non-streamed: every request's text and finish reason, or None if the client went
        away first (its requests are then aborted)."""
        texts, reasons = [""] * len(reqs), [None] * len(reqs)

        async def run():
            async for i, text, _, _, reason in self.updates(reqs, stops):
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

    async def events(self, reqs, stops, chunk_of: Callable, tail: Callable | None = None):
        """SSE: chunk_of(index, text, tokens, logprobs, reason) per update (None: nothing to
        send for it), then tail() if given, then [DONE]; a request the engine fails ends the
        stream with an `error` event (it began with a 200)."""
        try:
            async for i, text, tokens, logprobs, reason in self.updates(reqs, stops):
                body = chunk_of(i, text, tokens, logprobs, reason)
                if body is not None:        # None: the route holds this update back
                    yield sse(body)
        except (EngineUnavailable, RequestFailed) as e:
            yield sse(engine_error_body(e))
        else:
            if tail is not None:
                yield sse(tail())
        yield "data: [DONE]\n\n"

    async def respond(self, stream: bool, reqs, http: Request, stops, chunk_of: Callable,
                      whole: Callable, tail: Callable | None = None) -> Response | dict:
        """SSE chunks when stream, else whole(texts, reasons) once every request ended (499
        if the client left first)."""
        if stream:
            return StreamingResponse(self.events(reqs, stops, chunk_of, tail),
                                     media_type="text/event-stream")
        result = await self.collect(reqs, http, stops)
        return Response(status_code=499) if result is None else whole(*result)


def serving(http: Request) -> Serving:
    """The app's Serving (a FastAPI dependency)."""
    return http.app.state.serving


async def _wait_disconnect(http: Request) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
