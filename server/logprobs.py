"""Log probabilities in each API's shape, from what the engine returns per sampled token:
(its log probability, {token id: log probability} of the most likely tokens asked for).
Token strings are each id decoded alone, special tokens kept (as vLLM returns them; a byte of
a multi-byte character decodes to U+FFFD)."""

from models import Tokenizer


def token_text(tokenizer: Tokenizer | None, token: int) -> str:
    if tokenizer is None:
        return f"token_id:{token}"
    return tokenizer.decode([token], skip_special_tokens=False)


def completions(tokenizer, tokens: list[int], logprobs: list, offset: int = 0) -> dict:
    """/v1/completions' choice.logprobs; offset: the characters of the choice's text before
    these tokens (text_offset counts from it). An entry of logprobs may be None (an echoed
    prompt's first token): its log probability and top_logprobs are then null."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts,
            "token_logprobs": [None if x is None else x[0] for x in logprobs],
            "top_logprobs": [None if x is None else
                             {token_text(tokenizer, t): v for t, v in x[1].items()}
                             for x in logprobs],
            "text_offset": offsets}


def chat(tokenizer, tokens: list[int], logprobs: list) -> dict:
    """/v1/chat/completions' choice.logprobs."""
    def entry(token, lp):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [entry(t, lp) | {"top_logprobs": [entry(k, v) for k, v in top.items()]}
                        for t, (lp, top) in zip(tokens, logprobs)]}


def sglang(tokens: list[int], logprobs: list, kind: str = "output") -> dict:
    """/generate's meta_info fields (kind "output", or "input" for the prompt's): [log
    probability, token id, None] per token (SGLang leaves the text None unless
    return_text_in_logprobs, which is not taken here); a None entry of logprobs (the prompt's
    first token) gives [None, token id, None] and no top tokens."""
    return {f"{kind}_token_logprobs": [[None if x is None else x[0], t, None]
                                       for t, x in zip(tokens, logprobs)],
            f"{kind}_top_logprobs": [None if x is None else [[v, k, None] for k, v in x[1].items()]
                                     for x in logprobs]}
