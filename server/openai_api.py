"""OpenAI's routes: /v1/completions, /v1/chat/completions (each streamed as SSE or not, with
log probabilities of the sampled tokens when asked: server.logprobs; response_format as
structured output: engine.guided) and /v1/models. Extensions to OpenAI's fields: top_k,
ignore_eos, stop_token_ids, response_format on completions (as vLLM); every choice carries its
token_ids."""

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server import logprobs, tools
from server.errors import ApiError
from server.protocol import ChatRequest, CompletionRequest
from server.serving import Serving, sampling_params, serving, usage

router = APIRouter()
# What SamplingParams' structured-output fields are called here.
GUIDED_FIELDS = {"guided_json": "response_format", "guided_regex": "response_format"}
Ctx = Annotated[Serving, Depends(serving)]


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request, s: Ctx):
    s.check_model(body.model)
    # echo: the prompt comes back before the completion, with its tokens' log probabilities
    # when logprobs is set (the first token's null, as OpenAI's); with max_tokens 0 the prompt
    # alone (what lm-evaluation-harness sends for log-likelihoods: one token is drawn and
    # dropped).
    prompt_only = body.echo and body.max_tokens == 0
    reqs = await s.make_requests(
        body.prompt,
        lambda _, j: sampling_params(body, 1 if prompt_only else body.max_tokens,
                                     body.min_tokens, j, body.logprobs,
                                     body.logprobs if body.echo else None),
        body.n, GUIDED_FIELDS)
    s.check_up()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": s.model_name}
    tok = s.front.tokenizer
    offsets = [0] * len(reqs)      # characters of each choice's token strings so far
    echoed = set()

    def echo(i, text, tokens, lps):
        """A choice's text, token ids and log probabilities with the prompt's before them, on
        its first chunk (all of them without streaming); the completion's dropped when it
        was drawn only to read the prompt's."""
        if prompt_only:
            text, tokens, lps = "", [], None if lps is None else []
        if not body.echo or i in echoed:
            return text, tokens, lps
        echoed.add(i)
        r = reqs[i]
        if lps is not None:
            lps = [None, *r.prompt_logprobs] + lps
        given = body.prompt[i // body.n]               # n choices per prompt
        if not isinstance(given, str):
            given = "" if tok is None else tok.decode(given, skip_special_tokens=False)
        return given + text, r.prompt + tokens, lps

    def chunk(i, text, tokens, lps, reason):
        text, tokens, lps = echo(i, text, tokens, lps)
        lp = None
        if lps is not None:
            lp = logprobs.completions(tok, tokens, lps, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        return head | {"choices": [{"index": i, "text": text, "token_ids": tokens,
                                    "logprobs": lp, "finish_reason": reason}]}

    def whole(texts, reasons):
        choices = []
        for i, (t, r, reason) in enumerate(zip(texts, reqs, reasons)):
            t, tokens, lps = echo(i, t, list(r.output),
                                  None if body.logprobs is None else r.logprobs)
            choices.append({"index": i, "text": t, "token_ids": tokens, "finish_reason": reason,
                            "logprobs": None if lps is None else logprobs.completions(
                                tok, tokens, lps)})
        return head | {"choices": choices, "usage": usage(reqs, prompt_only)}

    tail = (lambda: head | {"choices": [], "usage": usage(reqs, prompt_only)}
            ) if _include_usage(body) else None
    return await s.respond(body.stream, reqs, http, body.stop, chunk, whole, tail)


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, http: Request, s: Ctx):
    s.check_model(body.model)
    tokenizer = s.front.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so no chat template", "messages")
    tool_list = body.tool_dicts()
    try:
        ids = tokenizer.encode(tokenizer.apply_chat_template(
            [m.model_dump(exclude_none=True) for m in body.messages], tools=tool_list),
            add_special_tokens=False)
    except Exception as e:   # noqa: BLE001 - a template error is the client's input
        raise ApiError(400, f"the chat template failed on these messages: {e}",
                       "messages") from None
    named = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, named)
    forced = body.forced_choice()
    # The output is read for tool calls once whole (server.tools): forced, or under "auto" in
    # the format the template teaches; a stream then sends it in one chunk at the end.
    fmt = tools.format_of(tokenizer.chat_template) if body.tool_choice == "auto" else None
    reading = tool_list is not None and (forced is not None or fmt is not None)

    top = (body.top_logprobs or 0) if body.logprobs else None

    def params_of(prompt, j):
        n = s.front.default_max_tokens(len(prompt)) if max_tokens is None else max_tokens
        return sampling_params(body, n, body.min_tokens, j, top)
    guided = {"guided_json": "tool_choice"} if forced is not None else GUIDED_FIELDS
    reqs = await s.make_requests([ids], params_of, body.n,
                                 guided | {"prompt": "messages", "max_tokens": named})
    s.check_up()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": s.model_name}
    opened = set()
    held = [("", [], []) for _ in reqs]      # while reading for calls: text, tokens, logprobs

    def message(text, reason) -> tuple[dict, str]:
        if not reading:
            return {"content": text}, reason
        content, calls, reason = tools.read_calls(text, reason, tool_list, forced, fmt)
        return {"content": content} | ({"tool_calls": calls} if calls else {}), reason

    def chunk(i, text, tokens, lps, reason):
        if reading:
            text, tokens, lps = (a + b for a, b in zip(held[i], (text, tokens, lps or [])))
            held[i] = (text, tokens, lps)
            if reason is None:
                return None
            lps = lps if top is not None else None
        delta, reason = message(text, reason)
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": k} | c for k, c in enumerate(delta["tool_calls"])]
        delta |= {} if i in opened else {"role": "assistant"}
        opened.add(i)
        lp = None if lps is None else logprobs.chat(tokenizer, tokens, lps)
        return head | {"choices": [{"index": i, "delta": delta, "token_ids": tokens,
                                    "logprobs": lp, "finish_reason": reason}]}

    def whole(texts, reasons):
        choices = []
        for i, (t, r, reason) in enumerate(zip(texts, reqs, reasons)):
            msg, reason = message(t, reason)
            choices.append({"index": i, "message": {"role": "assistant"} | msg,
                            "logprobs": None if top is None else logprobs.chat(
                                tokenizer, r.output, r.logprobs),
                            "finish_reason": reason})
        return head | {"object": "chat.completion", "usage": usage(reqs), "choices": choices}

    tail = (lambda: head | {"choices": [], "usage": usage(reqs)}) if _include_usage(body) else None
    return await s.respond(body.stream, reqs, http, body.stop, chunk, whole, tail)


@router.get("/v1/models")
async def models(s: Ctx):
    return {"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": 0, "owned_by": "hybridkv",
        "max_model_len": s.front.context_length}]}
