"""SGLang's native /generate (text or input_ids; text, output_ids and meta_info back, a list of
them with an index each for n > 1), and the
operational routes: /health, /metrics (Prometheus), /flush_cache."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import ApiError
from server.logprobs import sglang as sglang_logprobs
from server.protocol import GenerateRequest
from server.serving import Serving, sampling_params, serving

router = APIRouter()
Ctx = Annotated[Serving, Depends(serving)]


@router.post("/generate")
async def generate(body: GenerateRequest, http: Request, s: Ctx):
    if (body.text is None) == (body.input_ids is None):
        raise ApiError(400, "give exactly one of text and input_ids", "text")
    sp = body.sampling_params
    prompt_field = "text" if body.text is not None else "input_ids"
    names = {"prompt": prompt_field, "max_tokens": "sampling_params.max_new_tokens",
             "min_tokens": "sampling_params.min_new_tokens"} | {
        f: f"sampling_params.{f}" for f in (
            "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "logit_bias",
            "presence_penalty", "frequency_penalty", "repetition_penalty")} | {
        "guided_json": "sampling_params.json_schema", "guided_regex": "sampling_params.regex",
        "guided_grammar": "sampling_params.ebnf"}
    logprobs = body.top_logprobs_num if body.return_logprob else None
    # SGLang's: the prompt's log probabilities from position logprob_start_len (-1: none).
    start = body.logprob_start_len if logprobs is not None else -1
    reqs = await s.make_requests(
        [getattr(body, prompt_field)],
        lambda _, j: sampling_params(sp, sp.max_new_tokens, sp.min_new_tokens, j, logprobs,
                                     logprobs if start >= 0 else None),
        sp.n, names)
    s.check_up()

    def result(i, text, reason):
        """Choice i's answer; with n > 1 it carries its index (SGLang's)."""
        req = reqs[i]
        output = list(req.output)
        meta = {"id": req.rid, "prompt_tokens": len(req.prompt),
                "completion_tokens": len(output), "cached_tokens": req.cached_tokens,
                "host_cached_tokens": req.host_cached_tokens,
                "layout": req.layout, "finish_reason": reason}
        if logprobs is not None:
            meta |= sglang_logprobs(output, req.logprobs[:len(output)])
        if start >= 0:
            meta |= sglang_logprobs(req.prompt[start:],
                                    ([None] + req.prompt_logprobs)[start:], "input")
        return {"text": text, "output_ids": output, "meta_info": meta} | (
            {"index": i} if sp.n > 1 else {})

    text = [""] * sp.n

    def chunk(i, new, tokens, _logprobs, reason):  # each event: a choice's whole text so far
        text[i] += new
        return result(i, text[i], reason)

    def whole(texts, reasons):                     # n > 1: a list, one answer per choice
        answers = [result(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
        return answers if sp.n > 1 else answers[0]
    return await s.respond(body.stream, reqs, http, sp.stop, chunk, whole)


@router.get("/health")
async def health(s: Ctx):
    s.check_up()
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(s: Ctx):
    return Response(generate_latest(s.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/flush_cache")
async def flush_cache(s: Ctx):
    if not await s.engine.call("flush_cache"):
        raise ApiError(409, "requests are queued or running; flush the cache when idle", None,
                       "conflict")
    return {"flushed": True}
