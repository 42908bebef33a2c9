"""GGUF files (llama.cpp's format, as llama.cpp, Ollama and LM Studio users hold models) -> our
model and tokenizer, read with the `gguf` package (install it with `pip install gguf`).

The architecture and hyper-parameters come from the file's metadata, as a HF config would
give them (`models.config.from_hf_dict` then checks them); tensors are found under the names
llama.cpp's converter gives HF's (the gguf package's own name map), dequantised to float32 by
`gguf.quants.dequantize` (F32/F16/BF16 as stored; Q4_0, Q4_1, Q5_x, Q8_0, the K-quants and
the others that package dequantises) and cast to the run dtype.
llama.cpp's converter reorders the rows of a Llama query and key projection (it interleaves
the two halves of each head for its rotary layout); `unpermute` puts them back. The
tokenizer is a `tokenizers` byte-level BPE built from the vocabulary and merges in the
metadata, its control tokens special, split before BPE as the named pre-tokenizer splits
(PRE_TOKENIZERS: GPT-2's, Llama 3's, Qwen's), and the chat template comes from there too.
"""

import dataclasses
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from models.config import ConfigError, from_hf_dict
from models.loader import CheckpointError, load_tensors
from models.tokenizer import Tokenizer, TokenizerError

ARCHITECTURES = ("llama", "qwen2", "qwen3")   # GGUF names; mistral files say "llama"
CONTROL, USER_DEFINED = 3, 4                   # tokenizer.ggml.token_type values
# How each pre-tokenizer named in the metadata splits text before BPE: None is GPT-2's
# byte-level regex (transformers builds SmolLM2's so too: its vocabulary has no multi-digit
# merges, so llama.cpp's digit split changes nothing); otherwise the split pattern of that
# family's own tokenizer.json (Llama 3: digits in runs of up to 3; Qwen2/2.5/3: one digit at a
# time), then byte-level mapping. Others are refused, naming them.
_CONTRACTIONS_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCT_SPACE = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _CONTRACTIONS_WORDS + r"\p{N}{1,3}" + _PUNCT_SPACE,
    "qwen2": _CONTRACTIONS_WORDS + r"\p{N}" + _PUNCT_SPACE,
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a .gguf file needs the gguf package: pip install gguf "
                              "(or pip install -e '.[real]')") from None
    return gguf


def read(path: Path):
    """gguf's reader of a .gguf file, over a plain ndarray view of its memory map: the reader
    slices its data once or more per metadata value, and a slice of an np.memmap costs Python
    work of its own (__array_finalize__), so SmolLM2's 49k-token vocabulary took 3.0 s to read
    through the memmap and 0.75 s through the view, on this project's 2-core CPU."""
    gguf = _gguf()

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, mapped):
            self._data = np.asarray(mapped)     # a view of the same memory, not a copy

    try:
        return Reader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of a query / key projection's rows (or bias): within each
    head, rows 0, 2, 4, ... (then 1, 3, 5, ...) are HF's first (then second) half."""
    return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def read_config(fields: dict, path: Path) -> dict:
    """A HF-style config dict from a GGUF file's metadata."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                          f"supported: {list(ARCHITECTURES)}")

    def need(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{path.name}: GGUF metadata {arch}.{key} is missing")
        return value
    if fields.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ConfigError(f"{path.name}: rope scaling {fields[f'{arch}.rope.scaling.type']!r} "
                          "in GGUF metadata is not supported yet")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return {"model_type": arch, "vocab_size": int(vocab), "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(need("attention.head_count_kv", heads)),
            "head_dim": int(need("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(need("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(need("context_length")),
            "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": None if eos is None else int(eos)}


def read_tokenizer(fields: dict, path: Path) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2, Llama 3 and Qwen use) from the
    GGUF vocabulary and merges; control and user-defined tokens are added as special."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path.name}: GGUF tokenizer model {kind!r} is not supported; "
                             "supported: 'gpt2' (byte-level BPE)")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{path.name}: GGUF pre-tokenizer {pre!r} is not supported yet; "
                             f"supported: {sorted(PRE_TOKENIZERS)}")
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                          fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else (
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)])

    def token(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]
    if fields.get("tokenizer.ggml.add_bos_token") and token("bos") is not None:
        bos = token("bos")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tokens.index(bos))])])
    return Tokenizer(tok, chat_template=fields.get("tokenizer.chat_template"),
                     bos_token=token("bos"), eos_token=token("eos"))


def load_gguf(path: str | Path, dtype, progress: bool = True):
    """A .gguf file -> (model, tokenizer)."""
    gguf, path = _gguf(), Path(path)
    reader = read(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    raw = read_config(fields, path)
    tokenizer = read_tokenizer(fields, path)     # before the weights: refused early
    cfg = from_hf_dict(raw | {"tie_word_embeddings": "output.weight" not in
                              {t.name for t in reader.tensors}}, source=path.name)
    stored = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in stored:     # Llama 3.1-style scaling, as per-frequency divisors
        factors = np.asarray(stored["rope_freqs.weight"].data, np.float32).ravel()
        if factors.size != cfg.head_dim // 2:
            raise ConfigError(f"{path.name}: tensor 'rope_freqs.weight' holds {factors.size} "
                              f"factors; head_dim {cfg.head_dim} needs {cfg.head_dim // 2}")
        cfg = dataclasses.replace(cfg, rope=dataclasses.replace(
            cfg.rope, freq_factors=tuple(float(f) for f in factors)))
    permuted = ({"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
                if cfg.model_type == "llama" else {})
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == cfg.model_type)
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)   # HF name -> llama.cpp's

    def tensor(hf: str):
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name not in stored:
            raise CheckpointError(f"{path.name}: tensor {name!r} ({hf}) is missing")
        t = stored[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path.name}: tensor {name!r} is stored as "
                                  f"{t.tensor_type.name}, which the gguf package cannot "
                                  "dequantise") from None
        array = np.asarray(array, np.float32).reshape(tuple(int(n) for n in t.shape[::-1]))
        heads = permuted.get(name.split(".")[-2])
        return (unpermute(array, heads) if heads else array), f"{path.name}: tensor {name!r}"
    model = load_tensors(cfg, tensor, f"{path.name}'s metadata", dtype, progress,
                         f"dequantising {path.name}")
    return model, tokenizer
