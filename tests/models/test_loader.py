"""Checkpoint loading: config, safetensors (single and sharded), errors, orbax round trip."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers import FIXTURES
from safetensors.numpy import load_file, save_file

from models import CheckpointError, ConfigError, ModelConfig, Tokenizer, load_hf, restore_params, save_params
from models.config import from_hf_dict


@pytest.fixture
def llama_copy(tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", d)
    return d


def edit_config(directory, **changes):
    file = directory / "config.json"
    raw = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    file.write_text(json.dumps(raw))


def test_sharded_and_single_file_checkpoints_load():
    qwen2 = load_hf(FIXTURES / "qwen2", progress=False)      # two shards + index
    assert qwen2.cfg.tie_word_embeddings and qwen2.cfg.qkv_bias and qwen2.cfg.head_dim == 16
    qwen3 = load_hf(FIXTURES / "qwen3", progress=False)
    assert qwen3.cfg.qk_norm and qwen3.cfg.head_dim == 32 and qwen3.cfg.num_kv_heads == 1
    mistral = load_hf(FIXTURES / "mistral", progress=False)
    assert mistral.cfg.sliding_window == 8
    weights = load_file(FIXTURES / "qwen3" / "model.safetensors")
    np.testing.assert_array_equal(qwen3.layers[1].self_attn.k_proj.kernel[...],
                                  weights["model.layers.1.self_attn.k_proj.weight"].T)


def test_unknown_model_type_names_file_and_field(llama_copy):
    edit_config(llama_copy, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json.*model_type 'gpt2'"):
        load_hf(llama_copy)


def test_missing_field_is_named(llama_copy):
    edit_config(llama_copy, num_key_value_heads=None)
    with pytest.raises(ConfigError, match=r"config\.json.*'num_key_value_heads' is missing"):
        load_hf(llama_copy)


def test_missing_files_are_named(tmp_path, llama_copy):
    with pytest.raises(ConfigError, match="config.json: no such file"):
        load_hf(tmp_path)
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(llama_copy)
    qwen2 = tmp_path / "qwen2"
    shutil.copytree(FIXTURES / "qwen2", qwen2)
    (qwen2 / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_hf(qwen2)


def test_missing_tensor_and_shape_mismatch_are_named(llama_copy):
    file = llama_copy / "model.safetensors"
    weights = load_file(file)
    name = "model.layers.0.mlp.up_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, file)
    with pytest.raises(CheckpointError, match=f"'{name}' is missing"):
        load_hf(llama_copy, progress=False)
    weights[name] = weights[name][:-1]
    save_file(weights, file)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has shape "
                                              r"\(159, 96\), config.json implies \(160, 96\)"):
        load_hf(llama_copy, progress=False)


def test_rope_config_old_and_new_formats_agree():
    new = json.loads((FIXTURES / "llama" / "config.json").read_text())
    old = json.loads(json.dumps(new))
    params = old.pop("rope_parameters")
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    assert from_hf_dict(old) == from_hf_dict(new) == ModelConfig.from_hf(FIXTURES / "llama")
    old["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        from_hf_dict(old)


def test_orbax_round_trip(tmp_path):
    model = load_hf(FIXTURES / "mistral", progress=False)
    save_params(model, tmp_path / "ckpt")
    restored = restore_params(model.cfg, tmp_path / "ckpt")
    import flax.nnx as nnx
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(a, b)


def test_tokenizer_and_chat_template_match_hf():
    chat = json.loads((FIXTURES / "llama" / "chat.json").read_text())
    tok = Tokenizer.from_dir(FIXTURES / "llama")
    rendered = tok.apply_chat_template(chat["messages"], chat["add_generation_prompt"])
    assert rendered == chat["prompt"]
    assert tok.encode(rendered, add_special_tokens=False) == chat["prompt_ids"]
    assert tok.eos_token_id == chat["special_token_ids"][chat["eos_token"]]
    for example in chat["encode_examples"]:
        assert tok.encode(example["text"]) == example["ids_with_special_tokens"]
        assert tok.encode(example["text"], False) == example["ids_without_special_tokens"]
        assert tok.decode(example["ids_without_special_tokens"]) == example["text"]


@pytest.mark.parametrize("names", [("k_scale", "v_scale"), ("kv_scale", "kv_scale"),
                                   ("k_proj.output_scale", "v_proj.output_scale")])
def test_fp8_kv_scales_are_read(llama_copy, names):
    """A scalar scale applies to every KV head; one a KV head each to its own; a layer without
    scale tensors keeps scale 1.0 (None)."""
    weights = load_file(llama_copy / "model.safetensors")
    weights["model.layers.0.self_attn." + names[0]] = np.array(2.0, np.float32)
    weights["model.layers.0.self_attn." + names[1]] = np.array([0.5, 3.0], np.float32)
    save_file(weights, llama_copy / "model.safetensors")
    model = load_hf(llama_copy, progress=False)
    k, v = (2.0, 2.0), (0.5, 3.0)
    assert model.layers[0].self_attn.kv_scales == ((k, v) if names[0] != names[1] else (v, v))
    assert model.layers[1].self_attn.kv_scales is None


@pytest.mark.parametrize("value, message", [(np.ones(3, np.float32), "has 3 values"),
                                            (np.array([1.0, 0.0], np.float32), "positive")])
def test_bad_fp8_kv_scales_are_named(llama_copy, value, message):
    weights = load_file(llama_copy / "model.safetensors")
    weights["model.layers.1.self_attn.k_scale"] = value
    weights["model.layers.1.self_attn.v_scale"] = np.ones(2, np.float32)
    save_file(weights, llama_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.layers.1.self_attn.k_scale.*{message}"):
        load_hf(llama_copy, progress=False)


def gemma3_hub_config(**changes):
    """A Gemma 3 text config as the hub's checkpoints written by transformers 4.x have it: no
    layer_types nor per-type rope_parameters."""
    raw = dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128,
               num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
               rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1e6,
               rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
               sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
               final_logit_softcapping=None, attn_logit_softcapping=None)
    return from_hf_dict({**raw, **changes})


def test_gemma3_config_without_layer_types():
    """Layers 6, 12, ... (1-based) are global; local layers use rope_local_base_freq, global
    ones rope_theta with linear scaling; tied embeddings by default."""
    cfg = gemma3_hub_config()
    assert cfg.sliding_layers == (True,) * 5 + (False, True)
    assert [cfg.window(i) for i in (0, 5, 6)] == [512, None, 512] and cfg.windows == (512, None)
    assert cfg.rope_of(5).kind == "linear" and cfg.rope_of(5).theta == 1e6
    assert cfg.rope_of(0).kind == "default" and cfg.rope_of(0).theta == 1e4
    np.testing.assert_allclose(cfg.rope_of(5).inv_freq(32),
                               1 / 8 / 1e6 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
    assert cfg.tie_word_embeddings and cfg.qk_norm and cfg.gemma


def test_gemma2_layers_alternate():
    cfg = from_hf_dict(dict(
        model_type="gemma2", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1e4, sliding_window=4096,
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert cfg.sliding_layers == (True, False, True, False) and not cfg.qk_norm
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
    # absent: HF's Gemma2Config defaults (soft-caps 50 and 30, scalar 256, window 4096); an
    # explicit null turns a soft-cap off
    bare = from_hf_dict(dict(
        model_type="gemma2", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1e4,
        final_logit_softcapping=None))
    assert (bare.attn_logit_softcap, bare.final_logit_softcap) == (50.0, None)
    assert (bare.query_pre_attn_scalar, bare.sliding_window) == (256.0, 4096)


@pytest.mark.parametrize("raw, message", [
    (dict(model_type="gemma3"), "vision tower.*gemma3_text"),
    (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    (dict(layer_types=["chunked_attention"] * 7), "layer types \\['chunked_attention'\\]"),
    (dict(layer_types=["full_attention"] * 3), "3 layer types for 7 layers"),
])
def test_gemma_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        gemma3_hub_config(**raw)


def test_moe_layers_follow_sparse_step_and_dense_list():
    raw = json.loads((FIXTURES / "qwen3_moe" / "config.json").read_text())
    raw.update(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = from_hf_dict(raw)
    assert cfg.moe_layers == (False, True, False, False, False, True)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.norm_topk_prob) == (8, 2, True)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) must be between 1 and "
                                          r"num_experts \(8\)"):
        from_hf_dict({**raw, "num_experts_per_tok": 9})


def test_missing_or_misshapen_expert_is_named(tmp_path):
    d = tmp_path / "moe"
    shutil.copytree(FIXTURES / "qwen3_moe", d)
    weights = load_file(d / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    weights[name] = weights[name][:-1]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape \\(31, 64\\), expert "
                                              "0's \\(32, 64\\)"):
        load_hf(d, progress=False)
    del weights[name]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        load_hf(d, progress=False)


def test_mixtral_routes_every_layer_and_names_experts_its_way(tmp_path):
    """Every Mixtral layer is sparse, its experts of intermediate_size wide and their weights
    always renormalised; a missing expert is named as Mixtral spells it (block_sparse_moe,
    w1 / w2 / w3)."""
    cfg = from_hf_dict(json.loads((FIXTURES / "mixtral" / "config.json").read_text()))
    assert cfg.moe_layers == (True, True) and cfg.norm_topk_prob
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (4, 2, 48)
    assert cfg.sliding_window is None
    d = tmp_path / "mixtral"
    shutil.copytree(FIXTURES / "mixtral", d)
    weights = load_file(d / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    del weights[name]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        load_hf(d, progress=False)
