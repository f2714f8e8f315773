"""`cuda_or_xla`: our kernel on CUDA GPUs, XLA's computation elsewhere, in one program."""

import jax
import jax.numpy as jnp

from dirnet_jax.dispatch import cuda_or_xla, kernels_allowed, xla_only


def gpu(x):
    return jnp.sin(x) + 1  # stands for a kernel


def xla(x):
    return x * 2


def test_each_platform_runs_its_own_and_the_tests_the_kernel():
    x = jnp.float32(3.0)
    on_cpu = jax.default_backend() == "cpu"
    assert float(cuda_or_xla(gpu, xla, x)) == float(xla(x) if on_cpu else gpu(x))
    assert float(cuda_or_xla(gpu, xla, x, interpret=True)) == float(gpu(x))  # the tests
    assert float(cuda_or_xla(gpu, xla, x, taken=False, interpret=True)) == float(xla(x))
    traced = jax.jit(lambda x: cuda_or_xla(gpu, xla, x)).trace(x)
    assert "sine" in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "sine" not in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_xla_only_traces_xla_for_cuda_too_but_not_for_the_tests():
    x = jnp.float32(3.0)
    assert kernels_allowed()
    with xla_only():
        assert not kernels_allowed()
        traced = jax.jit(lambda x: cuda_or_xla(gpu, xla, x)).trace(x)
        assert float(cuda_or_xla(gpu, xla, x, interpret=True)) == float(gpu(x))
    assert kernels_allowed()
    assert "sine" not in traced.lower(lowering_platforms=("cuda",)).as_text()
