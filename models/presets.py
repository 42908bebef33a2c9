"""Embedded models that need no download. Their weights are random: their text is noise."""

import jax.numpy as jnp
import tokenizers
from flax import nnx
from tokenizers import decoders, pre_tokenizers

from models.config import ModelConfig, RopeConfig
from models.llama import Llama
from models.tokenizer import Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: one token per UTF-8 byte (ids 0-255), then special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)])
    return Tokenizer(tok, chat_template=CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's byte -> printable character table used by ByteLevel."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if ord(char) in printable:
        return ord(char)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(char) - 256]


def tiny_random(dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
    tokenizer = byte_tokenizer()
    cfg = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope=RopeConfig(10000.0), max_position_embeddings=2048, bos_token_id=256,
        eos_token_ids=(tokenizer.eos_token_id,))
    return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)), tokenizer


def shaped_random(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied,
                  max_positions=131072, rope=None, **family):
    """A preset with a real model's shapes (for benchmarks) and random weights. Token ids past
    the byte tokenizer's 261 decode to nothing. family: ModelConfig's fields of another
    family (model_type included); rope: Llama 3's base 500k without scaling by default."""
    def make(dtype=jnp.bfloat16) -> tuple[Llama, Tokenizer]:
        tokenizer = byte_tokenizer()
        cfg = ModelConfig(
            **{"model_type": "llama", **family}, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=intermediate, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
            rope=rope or RopeConfig(500000.0), max_position_embeddings=max_positions, bos_token_id=256,
            eos_token_ids=(tokenizer.eos_token_id,), tie_word_embeddings=tied)
        return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)), tokenizer
    return make


PRESETS = {
    "tiny-random": tiny_random,
    "llama-3.2-1b-random": shaped_random(2048, 8192, 16, 32, 8, 64, 128256, tied=True),
    # The 1B shape with 2**20 positions, for one request of a million tokens (issue 5).
    "llama-3.2-1b-random-1m": shaped_random(2048, 8192, 16, 32, 8, 64, 128256, tied=True,
                                            max_positions=1 << 20),
    "llama-3-8b-random": shaped_random(4096, 14336, 32, 32, 8, 128, 128256, tied=False),
    # A deliberately small shape (2 layers, 4 query heads, 1 KV head, head_dim 64) with 2**24
    # positions, for one request of 10 million tokens (issue 27): its causal prefill is ~1e17
    # FLOPs of attention, which an H100 does within one 10-minute call; the 1B shape's would take
    # ~16x longer. 512 bytes of KV a token: 10M tokens are 5.1 GB.
    "llama-2l-random-16m": shaped_random(256, 1024, 2, 4, 1, 64, 128256, tied=True,
                                         max_positions=1 << 24),
    # Gemma 3 4B's shape: 34 layers, every 6th global, the others a 1024-token window.
    "gemma-3-4b-random": shaped_random(
        2560, 10240, 34, 8, 4, 256, 262208, tied=True, rope=RopeConfig(1e6, "linear", 8.0),
        model_type="gemma3_text", gemma=True, qk_norm=True, sliding_window=1024,
        sliding_layers=tuple((i + 1) % 6 != 0 for i in range(34)),
        local_rope=RopeConfig(10000.0), query_pre_attn_scalar=256.0),
    # Qwen3-30B-A3B's shape: 48 layers of 128 experts of width 768, 8 a token.
    "qwen3-30b-a3b-random": shaped_random(
        2048, 6144, 48, 32, 4, 128, 151936, tied=False, max_positions=40960,
        rope=RopeConfig(1e6), model_type="qwen3_moe", qk_norm=True,
        moe_layers=(True,) * 48, num_experts=128, experts_per_token=8,
        moe_intermediate_size=768, norm_topk_prob=True),
}
