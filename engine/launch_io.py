"""What a launch takes from its requests (engine.step's Feed, DecodeState and SamplingArrays,
as numpy arrays padded to the launch's shape) and what it gives back to them per token (its
log probabilities). ModelRunner (engine.runner) packs these into a launch and reads them out."""

import numpy as np

from engine import limits
from engine.request import Request
from engine.step import DecodeState, Feed, SamplingArrays


def sampling_arrays(reqs: list[Request], width: int, filtering: bool,
                    stop_width: int) -> SamplingArrays:
    """Sampling arrays of reqs padded to width rows; the full sampler's (filtering) take each
    row's logit_bias, then its stop ids, barred (-inf) while it is short of min_tokens (a
    decode loop updates that part each step: engine.step.decode_loop)."""
    pad = width - len(reqs)
    p = [r.params for r in reqs]
    n = limits.MAX_LOGIT_BIAS
    cols = n + stop_width if filtering else 0
    bias_ids, bias = np.full((width, cols), -1, np.int32), np.zeros((width, cols), np.float32)
    for i, (r, x) in enumerate(zip(reqs, p)) if filtering else ():
        if x.logit_bias:
            bias_ids[i, :len(x.logit_bias)], bias[i, :len(x.logit_bias)] = zip(*x.logit_bias)
        bias_ids[i, n:n + len(r.stop_ids)] = r.stop_ids
        if min_left(r) > 0:
            bias[i, n:n + len(r.stop_ids)] = -np.inf
    return SamplingArrays(
        temperature=np.asarray([x.temperature for x in p] + [0.0] * pad, np.float32),
        top_k=np.asarray([x.top_k for x in p] + [0] * pad, np.int32),
        top_p=np.asarray([x.top_p for x in p] + [1.0] * pad, np.float32),
        seed=np.asarray([r.seed for r in reqs] + [0] * pad, np.uint32),
        filtering=filtering, bias_ids=bias_ids, bias=bias)


def feed(group, tokens: np.ndarray, filtering: bool, stop_width: int) -> Feed:
    """A Feed of group's (request, tokens fed) rows, padded to tokens' rows."""
    reqs = [r for r, _ in group]
    b = tokens.shape[0]
    pad = b - len(group)
    return Feed(rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32), tokens=tokens,
                num=np.asarray([n for _, n in group] + [0] * pad, np.int32),
                sampling=sampling_arrays(reqs, b, filtering, stop_width))


def next_token(r: Request) -> int:
    """What decode row r feeds: -1 for its row's next_token when that is a sample the host
    has not read, else its last token (a prompt's last token, when a chunk left just that)."""
    return -1 if r.pending else (r.output[-1] if r.output else r.prompt[-1])


def decode_state(reqs: list[Request], b: int, filtering: bool, stop_width: int,
                 steps: int = 1 << 30) -> DecodeState:
    """The DecodeState of a decode launch over reqs, padded to b rows, each row producing at
    most `steps` tokens (the plan's steps, when the loop runs more)."""
    stop = np.full((b, stop_width), -1, np.int32)
    for i, r in enumerate(reqs):
        stop[i, :len(r.stop_ids)] = r.stop_ids
    pad = b - len(reqs)
    remaining = np.asarray([min(r.budget, steps) for r in reqs] + [0] * pad, np.int32)
    return DecodeState(
        rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32),
        tokens=np.asarray([next_token(r) for r in reqs] + [0] * pad, np.int32),
        active=remaining > 0, remaining=remaining, stop_ids=stop,
        sampling=sampling_arrays(reqs, b, filtering, stop_width),
        min_left=np.asarray([min_left(r) for r in reqs] + [0] * pad, np.int32))


def min_left(r: Request) -> int:
    """Tokens r must still draw before a stop id may end it (its unread draws counted)."""
    return max(0, r.params.min_tokens - len(r.output) - r.pending)


def token_logprobs(r: Request, logprob, top_ids, top_logprobs) -> tuple[float, dict[int, float]]:
    """A sampled token's log probability and the r.params.logprobs most likely tokens'."""
    n = r.params.logprobs
    return float(logprob), dict(zip(top_ids[:n].tolist(), top_logprobs[:n].tolist()))
