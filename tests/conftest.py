import gc
import os
import shutil
import tempfile

import jax
import pytest

# Eight CPU devices for the tensor-parallel tests. XLA reads the flag when JAX starts its
# backend, which importing jax does not do; a device count set by the caller is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()


def pytest_configure(config):
    """JAX's persistent compilation cache in a directory of this run's own (unless the caller
    chose one): the many engines of the suite compile the same step programs, and a later one
    loads what an earlier one compiled (tests/engine/test_decode.py: 85 s -> 70 s). Under
    pytest-xdist the controller makes the directory and its workers inherit it through the
    environment, so each loads what the other compiled."""
    from engine.engine import use_compilation_cache
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        directory = tempfile.mkdtemp(prefix="hybridkv-tests-jax-")
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    use_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need an accelerator: skipped, with the reason, everywhere else."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.default_backend()!r}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """After each test module, what JAX keeps compiled for it goes. XLA maps each CPU
    executable's code into memory: one process running the whole suite held ~27k mappings by a
    fifth of it, and around the 575th test reached the kernel's limit (vm.max_map_count,
    65530), where XLA crashed inside a compile (SIGSEGV, then SIGABRT in CI)."""
    yield
    gc.collect()
    jax.clear_caches()
    gc.collect()
