"""server.text_stream.TextStream: pushed in pieces, its text adds up to the whole decode."""

import random

import pytest
import tokenizers
from helpers import FIXTURES
from tokenizers import decoders

from models.presets import byte_tokenizer
from models.tokenizer import Tokenizer
from server.text_stream import TextStream


def sentencepiece_like() -> Tokenizer:
    """A Llama-2 / Mistral-style decoder: "▁" for spaces, byte-fallback pieces <0xNN>, the
    leading space of the text stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "▁h", "▁he", "llo", "▁w", "or", "ld", "é", "▁n", "ext", "x"]:
        vocab[piece] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], byte_fallback=True,
                                                     unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return Tokenizer(tok)


TOKENIZERS = {"byte": byte_tokenizer, "llama-fixture": lambda: Tokenizer.from_dir(FIXTURES / "llama"),
              "sentencepiece-like": sentencepiece_like}


def stream(tokenizer, ids, stops=(), stop_ids=(), seed=0):
    """Pushes ids in random pieces; returns (the pieces of text, the stream)."""
    rng = random.Random(seed)
    s, out, i = TextStream(tokenizer, stop_ids, list(stops)), [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(s.push(ids[i:i + n], final=i + n >= len(ids)))
        i += n
    return out, s


def random_ids(name: str, tok, rng: random.Random) -> list[int]:
    """Random token ids; for the byte-fallback tokenizer, whole characters only (see
    TextStream: an invalid run of byte tokens decodes as a whole)."""
    if name != "sentencepiece-like":
        return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 80))]
    ids = []
    for _ in range(rng.randint(1, 40)):
        if rng.random() < 0.5:
            ids.append(rng.randrange(259, tok.vocab_size))                 # a piece
        else:                                                              # a character's bytes
            char = chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x800),
                                   rng.randrange(0x800, 0xD800), rng.randrange(0x10000, 0x1F600)]))
            ids += [3 + b for b in char.encode()]
    return ids


@pytest.mark.parametrize("name", TOKENIZERS)
def test_pieces_add_up_to_the_whole_decode(name):
    tok = TOKENIZERS[name]()
    rng = random.Random()
    for trial in range(30):
        ids = random_ids(name, tok, rng)
        pieces, _ = stream(tok, ids, seed=trial)
        assert "".join(pieces) == tok.decode(ids), (name, ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_streams_whole_characters(name):
    """Encoded text with multi-byte characters: no piece carries a partial one."""
    tok = TOKENIZERS[name]()
    text = "hello wörld, next — 日本語 🙂 héllo"
    ids = tok.encode(text, add_special_tokens=False)
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces), pieces


def test_stop_strings_cut_at_the_first_across_pieces():
    tok = byte_tokenizer()
    ids = tok.encode("one two STOP three END four", add_special_tokens=False)
    for seed in range(10):
        pieces, s = stream(tok, ids, stops=["END", "STOP"], seed=seed)
        assert "".join(pieces) == "one two " and s.stopped     # "S", "ST", ... never went out
    for stops in (["absent"], ["STOP!"], ["four!"]):        # held back, then let go
        pieces, s = stream(tok, ids, stops=stops)
        assert "".join(pieces) == "one two STOP three END four" and not s.stopped


def test_stop_ids_are_not_text():
    tok = byte_tokenizer()
    ids = tok.encode("ab", add_special_tokens=False)
    pieces, _ = stream(tok, ids + [ids[0]], stop_ids=[ids[0]])
    assert "".join(pieces) == "b"


def test_a_long_output_decodes_a_bounded_window():
    """Each push decodes the tokens since the last whole character, not the whole output."""
    class Counting:
        def __init__(self, tok):
            self.tok, self.decoded = tok, []

        def decode(self, ids):
            self.decoded.append(len(ids))
            return self.tok.decode(ids)
    tok = Counting(byte_tokenizer())
    s = TextStream(tok, [], [])
    for t in tok.tok.encode("abcdefgh" * 200, add_special_tokens=False):
        s.push([t], final=False)
    assert s.text == "abcdefgh" * 200 and max(tok.decoded) <= 2
