"""Llama-family models in Flax NNX, HF checkpoint loading, tokenizer, embedded presets."""

from pathlib import Path

import jax.numpy as jnp

from models.config import FAMILIES, ConfigError, ModelConfig, RopeConfig
from models.llama import Group, Llama
from models.loader import CheckpointError, load_hf, restore_params, save_params
from models.presets import PRESETS
from models.tokenizer import Tokenizer, TokenizerError


def load_model(model: str, dtype=jnp.float32, progress: bool = True
               ) -> tuple[Llama, Tokenizer | None]:
    """A preset name (see PRESETS) or a HF checkpoint directory -> (model, tokenizer or None
    when the directory has no tokenizer.json)."""
    if model in PRESETS:
        return PRESETS[model](dtype)
    directory = Path(model)
    if not directory.is_dir():
        raise CheckpointError(f"model {model!r} is neither a preset ({sorted(PRESETS)}) nor a "
                              "checkpoint directory")
    tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
    return load_hf(directory, dtype, progress), tokenizer


__all__ = ["FAMILIES", "ConfigError", "ModelConfig", "RopeConfig", "Group", "Llama", "CheckpointError",
           "load_hf", "restore_params", "save_params", "PRESETS", "Tokenizer", "TokenizerError",
           "load_model"]
