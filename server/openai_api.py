"""OpenAI's routes: /v1/completions, /v1/chat/completions (each streamed as SSE or not, with
log probabilities of the sampled tokens when asked: server.logprobs) and /v1/models.
Extensions to OpenAI's fields: top_k, ignore_eos, stop_token_ids; every choice carries its
token_ids."""

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server import logprobs
from server.errors import ApiError
from server.protocol import ChatRequest, CompletionRequest
from server.serving import Serving, sampling_params, serving, usage

router = APIRouter()
Ctx = Annotated[Serving, Depends(serving)]


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request, s: Ctx):
    s.check_model(body.model)
    reqs = s.make_requests(
        body.prompt,
        lambda _, j: sampling_params(body, body.max_tokens, body.min_tokens, j, body.logprobs),
        body.n)
    s.check_up()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": s.model_name}
    tok = s.front.tokenizer
    offsets = [0] * len(reqs)      # characters of each choice's token strings so far

    def chunk(i, text, tokens, lps, reason):
        lp = None
        if lps is not None:
            lp = logprobs.completions(tok, tokens, lps, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        return head | {"choices": [{"index": i, "text": text, "token_ids": tokens,
                                    "logprobs": lp, "finish_reason": reason}]}

    def whole(texts, reasons):
        return head | {"choices": [
            {"index": i, "text": t, "token_ids": r.output, "finish_reason": reason,
             "logprobs": None if body.logprobs is None else logprobs.completions(
                 tok, r.output, r.logprobs)}
            for i, (t, r, reason) in enumerate(zip(texts, reqs, reasons))],
            "usage": usage(reqs)}

    tail = (lambda: head | {"choices": [], "usage": usage(reqs)}) if _include_usage(body) else None
    return await s.respond(body.stream, reqs, http, body.stop, chunk, whole, tail)


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, http: Request, s: Ctx):
    s.check_model(body.model)
    tokenizer = s.front.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so no chat template", "messages")
    try:
        ids = tokenizer.encode(tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in body.messages]), add_special_tokens=False)
    except Exception as e:   # noqa: BLE001 - a template error is the client's input
        raise ApiError(400, f"the chat template failed on these messages: {e}",
                       "messages") from None
    named = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, named)

    top = (body.top_logprobs or 0) if body.logprobs else None

    def params_of(prompt, j):
        n = s.front.default_max_tokens(len(prompt)) if max_tokens is None else max_tokens
        return sampling_params(body, n, body.min_tokens, j, top)
    reqs = s.make_requests([ids], params_of, body.n, {"prompt": "messages", "max_tokens": named})
    s.check_up()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": s.model_name}
    opened = set()

    def chunk(i, text, tokens, lps, reason):
        delta = {"content": text} | ({} if i in opened else {"role": "assistant"})
        opened.add(i)
        lp = None if lps is None else logprobs.chat(tokenizer, tokens, lps)
        return head | {"choices": [{"index": i, "delta": delta, "token_ids": tokens,
                                    "logprobs": lp, "finish_reason": reason}]}

    def whole(texts, reasons):
        return head | {"object": "chat.completion", "usage": usage(reqs), "choices": [
            {"index": i, "message": {"role": "assistant", "content": t},
             "logprobs": None if top is None else logprobs.chat(tokenizer, r.output, r.logprobs),
             "finish_reason": reason}
            for i, (t, r, reason) in enumerate(zip(texts, reqs, reasons))]}

    tail = (lambda: head | {"choices": [], "usage": usage(reqs)}) if _include_usage(body) else None
    return await s.respond(body.stream, reqs, http, body.stop, chunk, whole, tail)


@router.get("/v1/models")
async def models(s: Ctx):
    return {"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "hybridkv",
        "max_model_len": s.front.context_length}]}
