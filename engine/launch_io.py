"""What a launch takes from its requests (engine.step's Feed, DecodeState and SamplingArrays,
as numpy arrays padded to the launch's shape) and what it gives back to them per token (its
log probabilities). ModelRunner (engine.runner) packs these into a launch and reads them out."""

import typing

import numpy as np

from engine import guided, limits
from engine.request import Request
from engine.sampling import GUIDED, PLAIN, PROMPT_SEEN
from engine.step import DecodeState, Feed, SamplingArrays


class Widths(typing.NamedTuple):
    """Per-row widths every launch of an engine has, whatever its requests: one compiled
    shape for all."""
    stop: int        # stop ids (engine.limits, EOS included, bucketed)
    mask: int        # int32 words of a grammar's bitmask (engine.guided.mask_words)


def sampling_arrays(reqs: list[Request], width: int, level: int,
                    widths: Widths) -> SamplingArrays:
    """Sampling arrays of reqs padded to width rows, for a sampler of `level`
    (engine.sampling); above PLAIN they take each row's logit_bias, then its stop ids, barred
    (-inf) while it is short of min_tokens (a decode loop updates that part each step:
    engine.step.decode_loop); from GUIDED up, each guided row's next-token mask, from its
    matcher as it stands (every token before read)."""
    pad = width - len(reqs)
    p = [r.params for r in reqs]
    n = limits.MAX_LOGIT_BIAS
    cols = n + widths.stop if level > PLAIN else 0
    bias_ids, bias = np.full((width, cols), -1, np.int32), np.zeros((width, cols), np.float32)
    for i, (r, x) in enumerate(zip(reqs, p)) if cols else ():
        if x.logit_bias:
            bias_ids[i, :len(x.logit_bias)], bias[i, :len(x.logit_bias)] = zip(*x.logit_bias)
        bias_ids[i, n:n + len(r.stop_ids)] = r.stop_ids
        if min_left(r) > 0:
            bias[i, n:n + len(r.stop_ids)] = -np.inf
    allowed = np.full((width, widths.mask if level >= GUIDED else 0), -1, np.int32)
    if level >= GUIDED:
        guided.fill(allowed, [(r.matcher, i) for i, r in enumerate(reqs)
                              if r.matcher is not None])

    def per_row(values, fill, dtype):
        return np.asarray(values + [fill] * pad, dtype)

    return SamplingArrays(
        temperature=per_row([x.temperature for x in p], 0.0, np.float32),
        top_k=per_row([x.top_k for x in p], 0, np.int32),
        top_p=per_row([x.top_p for x in p], 1.0, np.float32),
        seed=per_row([r.seed for r in reqs], 0, np.uint32),
        level=level, bias_ids=bias_ids, bias=bias,
        presence=per_row([x.presence_penalty for x in p], 0.0, np.float32),
        frequency=per_row([x.frequency_penalty for x in p], 0.0, np.float32),
        repetition=per_row([x.repetition_penalty for x in p], 1.0, np.float32),
        allowed=allowed)


def feed(group, tokens: np.ndarray, level: int, widths: Widths,
         targets: np.ndarray | None = None) -> Feed:
    """A Feed of group's (request, tokens fed) rows, padded to tokens' rows (targets, if
    given, to tokens' shape)."""
    reqs = [r for r, _ in group]
    b = tokens.shape[0]
    pad = b - len(group)
    return Feed(rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32), tokens=tokens,
                num=np.asarray([n for _, n in group] + [0] * pad, np.int32),
                sampling=sampling_arrays(reqs, b, level, widths),
                emits=np.asarray([n == r.to_feed for r, n in group] + [False] * pad),
                targets=None if targets is None else np.pad(
                    targets, [(0, m - n) for m, n in zip(tokens.shape, targets.shape)],
                    constant_values=-1))


def next_token(r: Request) -> int:
    """What decode row r feeds: -1 for its row's next_token when that is a sample the host
    has not read, else its last token (a prompt's last token, when a chunk left just that)."""
    return -1 if r.pending else (r.output[-1] if r.output else r.prompt[-1])


def decode_state(reqs: list[Request], b: int, level: int, widths: Widths,
                 steps: int = 1 << 30) -> DecodeState:
    """The DecodeState of a decode launch over reqs, padded to b rows, each row producing at
    most `steps` tokens (the plan's steps, when the loop runs more; one for a guided row)."""
    stop = np.full((b, widths.stop), -1, np.int32)
    for i, r in enumerate(reqs):
        stop[i, :len(r.stop_ids)] = r.stop_ids
    pad = b - len(reqs)
    remaining = np.asarray([r.draws(steps) for r in reqs] + [0] * pad, np.int32)
    return DecodeState(
        rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32),
        tokens=np.asarray([next_token(r) for r in reqs] + [0] * pad, np.int32),
        active=remaining > 0, remaining=remaining, stop_ids=stop,
        sampling=sampling_arrays(reqs, b, level, widths),
        min_left=np.asarray([min_left(r) for r in reqs] + [0] * pad, np.int32))


def counts_rows(reqs: list[Request], width: int, max_rows: int,
                vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [width], their KVCache.counts [width, vocab]) of requests being admitted, as the
    host knows them: generated tokens counted (those of a request preempted before), the
    prompt's ids flagged; padded with row max_rows (past the last: written nowhere)."""
    rows = np.full(width, max_rows, np.int32)
    values = np.zeros((width, vocab), np.int32)
    for i, r in enumerate(reqs):
        rows[i] = r.row
        values[i] = np.bincount(np.asarray(r.output, np.int64), minlength=vocab)
        values[i, np.asarray(r.prompt, np.int64)] |= PROMPT_SEEN
    return rows, values


def min_left(r: Request) -> int:
    """Tokens r must still draw before a stop id may end it (its unread draws counted)."""
    return max(0, r.params.min_tokens - len(r.output) - r.pending)


def token_logprobs(n: int, logprob, top_ids, top_logprobs) -> tuple[float, dict[int, float]]:
    """A token's log probability and the n most likely tokens'."""
    return float(logprob), dict(zip(top_ids[:n].tolist(), top_logprobs[:n].tolist()))


def prompt_targets(group, starts: list[int], width: int) -> np.ndarray:
    """Feed.targets of a group of (request, tokens fed) chunks starting at `starts`, padded to
    `width` positions a row: the prompt token after each position, for requests that want
    prompt_logprobs (-1 elsewhere)."""
    targets = np.full((len(group), width), -1, np.int32)
    for i, ((r, n), start) in enumerate(zip(group, starts)):
        if r.params.prompt_logprobs is not None:
            after = r.prompt[start + 1:start + n + 1]
            targets[i, :len(after)] = after
    return targets


def read_prompt_logprobs(r: Request, start: int, n: int, logprob, top_ids,
                         top_logprobs) -> list[tuple[int, tuple]]:
    """(prompt position, its log probabilities) of the positions a chunk of n tokens from
    `start` predicts, from its row of engine.step.PromptLogprobs (numpy)."""
    k = r.params.prompt_logprobs
    return [(start + j + 1, token_logprobs(k, logprob[j], top_ids[j], top_logprobs[j]))
            for j in range(min(n, len(r.prompt) - 1 - start))]
