import jax
import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need an accelerator: skipped, with the reason, everywhere else."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.default_backend()!r}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
