"""Llama-family models in Flax NNX, HF checkpoint loading, tokenizer, embedded presets."""

from pathlib import Path

import jax.numpy as jnp

from models.config import FAMILIES, ConfigError, ModelConfig, RopeConfig
from models.llama import Group, Llama
from models.loader import CheckpointError, load_hf, restore_params, save_params
from models.packaged import PACKAGED, default_model, packaged_file
from models.presets import PRESETS
from models.tokenizer import Tokenizer, TokenizerError


def load_model(model: str, dtype=jnp.float32, progress: bool = True
               ) -> tuple[Llama, Tokenizer | None]:
    """A preset name (see PRESETS), a packaged model's name (see PACKAGED), a HF checkpoint
    directory, or a GGUF file (or a directory holding one .gguf and no config.json) ->
    (model, tokenizer or None when a HF directory has no tokenizer.json)."""
    if model in PRESETS:
        return PRESETS[model](dtype)
    path = packaged_file(model) if model in PACKAGED else Path(model)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if path.is_dir() and not (path / "config.json").is_file() and len(ggufs) == 1:
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        from models.gguf import load_gguf
        return load_gguf(path, dtype, progress)
    directory = path
    if not directory.is_dir():
        raise CheckpointError(f"model {model!r} is neither a preset ({sorted(PRESETS)}), a "
                              f"packaged model ({sorted(PACKAGED)}), a HF "
                              "checkpoint directory (config.json, *.safetensors, "
                              "tokenizer.json) nor a .gguf file")
    if ggufs and not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} holds {len(ggufs)} .gguf files and no config.json: "
                              "name the file, e.g. --model "
                              f"{ggufs[0]}")
    tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
    return load_hf(directory, dtype, progress), tokenizer


__all__ = ["FAMILIES", "ConfigError", "ModelConfig", "RopeConfig", "Group", "Llama", "CheckpointError",
           "load_hf", "restore_params", "save_params", "PRESETS", "PACKAGED", "default_model",
           "Tokenizer", "TokenizerError", "load_model"]
