"""Incremental detokenization for streams, with stop strings."""


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
