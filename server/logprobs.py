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
    these tokens (text_offset counts from it)."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in logprobs],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in top.items()}
                             for _, top in logprobs],
            "text_offset": offsets}


def chat(tokenizer, tokens: list[int], logprobs: list) -> dict:
    """/v1/chat/completions' choice.logprobs."""
    def entry(token, lp):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [entry(t, lp) | {"top_logprobs": [entry(k, v) for k, v in top.items()]}
                        for t, (lp, top) in zip(tokens, logprobs)]}


def sglang(tokens: list[int], logprobs: list) -> dict:
    """/generate's meta_info fields: [log probability, token id, None] per token (SGLang
    leaves the text None unless return_text_in_logprobs, which is not taken here)."""
    return {"output_token_logprobs": [[lp, t, None] for t, (lp, _) in zip(tokens, logprobs)],
            "output_top_logprobs": [[[v, k, None] for k, v in top.items()]
                                    for _, top in logprobs]}
