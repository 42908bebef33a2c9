import jax
import pytest


@pytest.fixture(autouse=True)
def interpret_on_the_cpu(request):
    """Kernel tests not marked `gpu` run on the CPU device, which every JAX install has.

    Interpret mode simulates a GPU or TPU kernel op by op in Python; on a GPU backend every one
    of those ops is a device launch and a sync, which made these tests many times slower on the
    H100 machine than on a 2-core CPU. Compiled kernels are tested by the `gpu` tests."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield
