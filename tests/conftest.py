import os

import jax
import pytest

# Eight CPU devices for the tensor-parallel tests. XLA reads the flag when JAX starts its
# backend, which importing jax does not do; a device count set by the caller is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need an accelerator: skipped, with the reason, everywhere else."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.default_backend()!r}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
