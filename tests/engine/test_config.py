"""One vocabulary of engine options: EngineConfig's fields are serve.py's flags (same names,
defaults and choices) and LLM's keyword arguments."""

import dataclasses

import pytest

import serve
from engine import EngineConfig
from engine.config import make_config
from models.packaged import default_model

FIELDS = dataclasses.fields(EngineConfig)


def test_every_option_is_a_flag_with_the_same_default():
    """But --model: a real model when one is installed (tests/models/test_packaged.py)."""
    args = serve.parse_args([])
    assert serve.engine_config(args) == EngineConfig(model=default_model())
    for f in FIELDS:
        assert getattr(args, f.name) == (default_model() if f.name == "model" else f.default), \
            f.name


def test_flags_set_every_option():
    values = {"model": "x", "dtype": "float16", "kv_cache_dtype": "fp8_e5m2", "layout": "paged",
              "static_max_tokens": 7,
              "page_size": 8, "max_total_tokens": 4096, "mem_fraction_static": 0.5,
              "context_length": 999, "max_running_requests": 3, "chunked_prefill_size": 100,
              "max_prefill_rows": 2, "num_continuous_decode_steps": 5,
              "disable_radix_cache": True, "host_kv_size": 0, "local_kv": "full",
              "kv_pool": "elastic",
              "kv_pool_min_tokens": 64, "kv_pool_growth": 4, "kv_shrink_after": 1.5,
              "attention_impl": "reference", "precompile": "all", "tensor_parallel_size": 1}
    assert set(values) == {f.name for f in FIELDS}, "a new option needs a value here"
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    assert serve.engine_config(serve.parse_args(argv)) == EngineConfig(**values)


def test_help_comes_from_the_config(capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in FIELDS:
        assert "--" + f.name.replace("_", "-") in out
        assert " ".join(f.metadata["help"].split())[:40] in out, f.name


@pytest.mark.parametrize("knobs, message", [
    ({"max_num_seqs": 4}, r"unknown engine option\(s\) \['max_num_seqs'\]"),
    ({"page_size": 0}, "page_size must be a power of two"),
    ({"kv_pool": "huge"}, "unknown kv_pool 'huge'"),
    ({"local_kv": "ring"}, r"unknown local_kv 'ring'; choose one of \['window', 'full'\]"),
    ({"mem_fraction_static": 1.5}, "mem_fraction_static must be in"),
    ({"context_length": 1}, "context_length must be >= 2"),
    ({"max_total_tokens": 8}, r"max_total_tokens must be >= page_size \(16\)"),
    ({"kv_pool_growth": 1}, "kv_pool_growth must be >= 2"),
    ({"host_kv_size": 64, "disable_radix_cache": True}, "host_kv_size"),
    ({"kv_shrink_after": -1.0}, "kv_shrink_after must be >= 0"),
    ({"disable_radix_cache": "yes"}, "disable_radix_cache must be bool"),
])
def test_bad_options_name_what_is_wrong(knobs, message):
    with pytest.raises(ValueError, match=message):
        make_config(**knobs)
