"""One int32 buffer per launch, each way. A pytree of arrays (int32, uint32, float32 or bool
leaves; registered dataclasses with static fields included) is flattened into one int32 vector
(bit-cast, not converted) and opened again by its Layout, a hashable description (the tree's
structure, static fields included, and each leaf's shape and dtype) that a jitted call takes
as a static argument. On the H100 machine each numpy argument of a jitted call cost 0.1-0.3 ms
of dispatch, and each result read about as much: a launch moves one buffer in and one out.

    host:   pack(tree) -> int32 [N]            device: unpack(buf, layout) -> tree
    device: pack(results) -> int32 [M]         host:   unpack(out, layout) -> numpy tree
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_KINDS = ("int32", "uint32", "float32", "bool")


@dataclasses.dataclass(frozen=True)
class Layout:
    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str], ...]     # (shape, dtype) of each leaf

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.leaves)


def layout_of(tree) -> Layout:
    leaves, treedef = jax.tree.flatten(tree)
    spec = tuple((tuple(x.shape), np.dtype(x.dtype).name) for x in leaves)
    bad = [d for _, d in spec if d not in _KINDS]
    if bad:
        raise TypeError(f"cannot pack leaves of dtype {bad}; the kinds are {_KINDS}")
    return Layout(treedef, spec)


def pack(tree):
    """The tree's leaves as one int32 vector: numpy on the host, jnp inside a jitted call."""
    leaves = jax.tree.leaves(tree)
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return np.concatenate([_bits_np(np.asarray(x)).ravel() for x in leaves] or
                              [np.zeros(0, np.int32)])
    return jnp.concatenate([_bits_jnp(jnp.asarray(x)).ravel() for x in leaves])


def unpack(buf, layout: Layout):
    """pack's vector back into the tree of `layout`: numpy arrays from a numpy buffer, jax
    arrays from a traced one."""
    xp, cast = (np, _from_bits_np) if isinstance(buf, np.ndarray) else (jnp, _from_bits_jnp)
    leaves, start = [], 0
    for shape, dtype in layout.leaves:
        n = math.prod(shape)
        leaves.append(cast(xp.reshape(buf[start:start + n], shape), dtype))
        start += n
    return jax.tree.unflatten(layout.treedef, leaves)


def _bits_np(x: np.ndarray) -> np.ndarray:
    return x.astype(np.int32) if x.dtype == np.bool_ else x.astype(x.dtype.name).view(np.int32)


def _from_bits_np(x: np.ndarray, dtype: str) -> np.ndarray:
    return x != 0 if dtype == "bool" else x.view(dtype)


def _bits_jnp(x):
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    return x if x.dtype == jnp.int32 else jax.lax.bitcast_convert_type(x, jnp.int32)


def _from_bits_jnp(x, dtype: str):
    if dtype == "bool":
        return x != 0
    return x if dtype == "int32" else jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
