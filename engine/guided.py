"""Structured output: a request's grammar (a JSON schema, a regular expression or a context-free
grammar, compiled by llguidance) says before each of its draws which tokens may come next, as
a bitmask that the sampler applies on the device (engine.sampling, the GUIDED level and above).

The mask of a draw depends on every token before it, so a guided row draws one token a launch
and is planned only once the host has read its last one (engine.scheduler); the host advances
the row's matcher as it reads each token (engine.request.Request.emit) and fills the row's mask
when it packs the next launch (engine.launch_io). JSON is compact by default (no whitespace
between tokens: a model cannot run on in spaces); a schema may ask otherwise through
llguidance's own "x-guidance" key, e.g. {"x-guidance": {"whitespace_flexible": true}}.
A context-free grammar comes in GBNF (llama.cpp's EBNF, what SGLang's `ebnf` takes; `root` is
its start) or in Lark, llguidance's own syntax; llguidance's converter tells them apart.
"""

import collections
import threading

import llguidance
import llguidance.gbnf_to_lark
import llguidance.numpy
import numpy as np

from engine.limits import InvalidRequest
from engine.sampling import GUIDED_FIELDS, SamplingParams

JSON_DEFAULTS = {"whitespace_flexible": False}
CACHED_GRAMMARS = 256       # compiled grammars kept per process, most recently used


def grammar(params: SamplingParams) -> str | None:
    """params' grammar in llguidance's form, or None for a request without structured output."""
    if params.guided_json is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(params.guided_json,
                                                             defaults=JSON_DEFAULTS)
    if params.guided_regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.guided_regex)
    if params.guided_grammar is not None:
        try:
            lark = llguidance.gbnf_to_lark.any_to_lark(params.guided_grammar)
        except Exception as e:      # GbnfToLarkError, or a bare Exception for an unknown rule
            raise ValueError(f"not a GBNF or Lark grammar: {e}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    return None


def mask_words(vocab: int) -> int:
    """int32 words of a vocabulary's bitmask."""
    return -(-vocab // 32)


class Grammars:
    """A process's grammar compiler for one model: its tokenizer as llguidance reads it and
    the compiled grammars (each request's matcher is a copy of one). Pickled (to the engine's
    process) without them: each process builds its own."""

    def __init__(self, tokenizer, vocab: int, eos_token_ids: tuple[int, ...]):
        """tokenizer: the model's (models.Tokenizer); vocab: the logits' width."""
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab, list(eos_token_ids)
        self._lock = threading.Lock()
        self._ll = None             # the tokenizer as llguidance reads it, made on first use
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = (
            collections.OrderedDict())

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "vocab": self.vocab, "eos": self.eos}

    def __setstate__(self, state):
        self.__init__(state["tokenizer"], state["vocab"], tuple(state["eos"]))

    def _template(self, params: SamplingParams) -> llguidance.LLMatcher:
        """The compiled matcher of params' grammar, fresh (no token consumed); raises
        InvalidRequest naming the field when the grammar does not compile."""
        field = next(f for f in GUIDED_FIELDS if getattr(params, f) is not None)
        try:
            text = grammar(params)
        except ValueError as e:
            raise InvalidRequest(f"{field}: {e}"[:500], field) from None
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(self.tokenizer.tok.to_str(),
                                                  n_vocab=self.vocab, eos_token=self.eos)
            template = self._compiled.get(text)
            if template is not None:
                self._compiled.move_to_end(text)
                return template
        template = llguidance.LLMatcher(self._ll, text, log_level=0)
        if template.is_error():
            raise InvalidRequest(f"{field} cannot be compiled: {template.get_error()}"[:500],
                                 field)
        with self._lock:
            self._compiled[text] = template
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return template

    def check(self, params: SamplingParams) -> None:
        """Raises InvalidRequest naming the field if params' grammar does not compile."""
        self._template(params)

    def matcher(self, params: SamplingParams) -> llguidance.LLMatcher:
        """A matcher of its own for a request with params (at its first token)."""
        return self._template(params).deep_copy()


_executor: list[llguidance.LLExecutor] = []      # the process's mask threads, made on first use


def fill(allowed: np.ndarray, rows: list[tuple[llguidance.LLMatcher, int]]) -> None:
    """Writes each (matcher, row)'s next-token mask into allowed [B, mask_words] int32, on
    llguidance's threads."""
    if rows:
        if not _executor:
            _executor.append(llguidance.LLExecutor())
        llguidance.numpy.fill_next_token_bitmask_par(_executor[0], rows, allowed)
