"""`cuda_or_xla`: our kernel on CUDA GPUs, XLA's computation elsewhere, in one program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dirnet_jax.dispatch import cuda_or_xla, default_platform, per_device, split_over


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


def test_split_over_runs_the_kernel_per_device_and_sums_what_it_says():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    split = NamedSharding(mesh, PartitionSpec("data"))
    x, w = jnp.arange(8.0).reshape(4, 2), jnp.float32(3.0)

    def kernel(x, w):
        return x * w, (x * w).sum(0)

    def run(x, w):
        return cuda_or_xla(kernel, None, x, w, interpret=True, batched=(True, False),
                           summed=(False, True))  # fmt: skip

    assert per_device(kernel, (True, False), (False, True)) is kernel  # outside: as it is
    with split_over(split):
        jaxpr = str(jax.make_jaxpr(run)(x, w))
        got = jax.jit(run)(x, w)
        with pytest.raises(ValueError, match="batched has 1 entries for 2 arguments"):
            cuda_or_xla(kernel, None, x, w, interpret=True, batched=(True,))
    assert "shard_map[" in jaxpr and "psum" in jaxpr
    for a, b in zip(got, kernel(x, w), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="split along axis 0"):
        with split_over(NamedSharding(mesh, PartitionSpec())):
            pass


def test_default_platform_names_the_gpu_kind(monkeypatch):
    backend = jax.default_backend()
    assert default_platform() in (("cuda", "rocm") if backend == "gpu" else (backend,))

    class Client:
        platform_version = ""

    class Device:
        client = Client()

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    for version, platform in (("cuda 12080", "cuda"), ("rocm 60302", "rocm")):
        Client.platform_version = version
        assert default_platform() == platform
