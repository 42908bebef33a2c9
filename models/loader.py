"""HF safetensors -> our NNX model, single file or sharded, with a progress bar.

Every tensor the model needs must be present with the right shape; a missing, extra-shaped or
unknown tensor raises an error that names the file and the tensor.
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm import tqdm

from models.config import ConfigError, ModelConfig
from models.llama import Llama


class CheckpointError(ValueError):
    """A checkpoint's weight files are missing, incomplete or do not match its config."""


def abstract_model(cfg: ModelConfig, dtype) -> Llama:
    """The model with shapes and dtypes only: nothing is allocated or initialised."""
    return nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def hf_name(path: tuple) -> tuple[str, bool]:
    """Our state path -> (HF tensor name, whether the HF tensor is transposed from ours)."""
    *mods, leaf = [str(p) for p in path]
    prefix = "" if mods == ["lm_head"] else "model."
    if leaf == "kernel":
        return prefix + ".".join(mods) + ".weight", True
    if leaf == "embedding":
        return prefix + ".".join(mods) + ".weight", False
    return prefix + ".".join(mods) + "." + leaf, False


# Mixtral keeps its router and experts under block_sparse_moe, and names the experts'
# projections w1 (gate), w3 (up) and w2 (down).
MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def family_name(cfg: ModelConfig, name: str) -> str:
    """hf_name's tensor name as cfg's family spells it."""
    if cfg.model_type == "mixtral":
        return name.replace(".mlp.", ".block_sparse_moe.")
    return name


def weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable or without 'weight_map' ({e})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index} names shard {file.name}, which is missing")
        return files
    if single.is_file():
        with safe_open(single, "flax") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{directory}: no model.safetensors nor model.safetensors.index.json")


def load_hf(directory: str | Path, dtype=jnp.float32, progress: bool = True) -> Llama:
    """Loads `config.json` and the safetensors weights of a HF checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = ModelConfig.from_hf(directory)
    files = weight_files(directory)
    handles = {}

    def tensor(name: str):
        if name not in files:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the "
                                  "safetensors files")
        if files[name] not in handles:
            handles[files[name]] = safe_open(files[name], "flax")
        return handles[files[name]].get_tensor(name), f"{files[name].name}: tensor {name!r}"
    try:
        model = load_tensors(cfg, tensor, "config.json", dtype, progress,
                             f"loading {directory.name}")
        read_kv_scales(model, lambda name: tensor(name) if name in files else None)
        return model
    finally:
        handles.clear()


# Where checkpoints keep fp8 KV-cache scales (as vLLM reads them), per layer: each name's K and
# V tensors, the first present wins. kv_scale is one scale for both.
KV_SCALE_NAMES = (("self_attn.k_scale", "self_attn.v_scale"),
                  ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
                  ("self_attn.kv_scale", "self_attn.kv_scale"))


def read_kv_scales(model: Llama, tensor) -> None:
    """Sets each attention layer's kv_scales from the checkpoint's scale tensors (scalar, or
    one a KV head), where it has them; tensor(HF name) -> (array, where) or None. A layer
    without them keeps scale 1.0. A scale of another shape, or not positive and finite, is a
    CheckpointError naming the tensor."""
    heads = model.cfg.num_kv_heads
    for i, layer in enumerate(model.layers):
        for names in KV_SCALE_NAMES:
            found = [tensor(f"model.layers.{i}.{name}") for name in names]
            if None in found:
                continue
            scales = []
            for array, where in found:
                array = np.asarray(array, np.float32).reshape(-1)
                if array.size not in (1, heads):
                    raise CheckpointError(f"{where} has {array.size} values: an fp8 KV scale "
                                          f"is one, or one a KV head ({heads})")
                if not np.all(np.isfinite(array) & (array > 0)):
                    raise CheckpointError(f"{where}: fp8 KV scales must be positive and "
                                          f"finite, got {array.tolist()}")
                scales.append(tuple(float(x) for x in np.broadcast_to(array, (heads,))))
            layer.self_attn.kv_scales = tuple(scales)
            break


def load_tensors(cfg: ModelConfig, tensor, config_source: str, dtype=jnp.float32,
                 progress: bool = True, desc: str = "loading") -> Llama:
    """The model of config cfg (read from config_source) with its weights from tensor(HF
    tensor name) -> (array in HF's layout, where it came from, for errors); tensor raises
    CheckpointError for one it lacks."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = dict(nnx.to_flat_state(state))
    for path, var in tqdm(flat.items(), desc=desc, unit="tensor", disable=not progress):
        name, transposed = hf_name(path)
        name = family_name(cfg, name)
        if str(path[-2]) == "experts":          # [E,...]: HF's tensor of each expert, stacked
            base, proj = name.rsplit(".", 1)
            if cfg.model_type == "mixtral":
                proj = MIXTRAL_EXPERTS[proj]
            parts = [tensor(f"{base}.{e}.{proj}.weight") for e in range(cfg.num_experts)]
            for array, where in parts[1:]:
                if array.shape != parts[0][0].shape:
                    raise CheckpointError(f"{where} has shape {tuple(array.shape)}, expert "
                                          f"0's {tuple(parts[0][0].shape)}")
            transposed = True
            array, where = jnp.stack([a for a, _ in parts], axis=-1), parts[0][1]   # [F,D,E]
        else:
            array, where = tensor(name)
        expected = var.get_value().shape
        expected = expected[::-1] if transposed else expected
        if array.shape != expected:
            raise CheckpointError(f"{where} has shape {tuple(array.shape)}, {config_source} "
                                  f"implies {tuple(expected)}")
        var.set_value(jnp.asarray(array.T if transposed else array, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_params(model: Llama, directory: str | Path) -> None:
    """Saves the converted parameters with orbax-checkpoint."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(directory).absolute(), nnx.state(model, nnx.Param))


def restore_params(cfg: ModelConfig, directory: str | Path, dtype=jnp.float32) -> Llama:
    """Restores parameters saved by `save_params` into a model of config `cfg`."""
    import orbax.checkpoint as ocp
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(Path(directory).absolute(), abstract)
    return nnx.merge(graphdef, state)


__all__ = ["CheckpointError", "ConfigError", "load_hf", "load_tensors", "save_params",
           "restore_params", "abstract_model"]
