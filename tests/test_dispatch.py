"""`cuda_or_xla`: our kernel on CUDA GPUs, XLA's computation elsewhere, in one program;
and a jax without Pallas' Triton backend, where XLA computes everything."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dirnet_jax import DIRNetConfig, train
from dirnet_jax.dispatch import cuda_or_xla, default_platform, per_device, split_over
from dirnet_jax.models import register
from dirnet_jax.toy import shifted_blobs


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


WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # as a jax without the backend
import jax, jax.numpy as jnp, numpy as np
from dirnet_jax import DIRNetConfig, dispatch, first_layer, init_variables, models
from dirnet_jax import pooled_layers, train, train_conv
from dirnet_jax.toy import shifted_blobs
assert dispatch.plgpu is None
assert not first_layer.applies((4, 256, 256, 2), 16, "avg", 1, form="dot1")
assert not pooled_layers.applies((4, 128, 128, 16), 16, "avg") and not train_conv.enabled()
# The 256² network lowers for CUDA with XLA's layers alone.
config = DIRNetConfig(image_shape=(256, 256), num_downsamplings=4)
pair = jnp.zeros((1, 256, 256, 1), jnp.float32)
traced = models.register.trace(config, init_variables(config, jax.random.key(0)), pair, pair)
assert "xla.gpu.triton" not in traced.lower(lowering_platforms=("cuda",)).as_text()
# A 28² model trains and registers.
toy = DIRNetConfig(**{config})
state = train.fit(toy, sys.argv[1], shifted_blobs(0, 8), progress=False)
pairs = shifted_blobs(1, 4)
grid = models.register(toy, {"params": state.params, "batch_stats": state.batch_stats},
                       pairs[:2], pairs[2:]).grid
np.save(sys.argv[2], np.asarray(grid))
"""


TOY = DIRNetConfig(image_shape=(28, 28), num_downsamplings=2, batch_size=4, num_steps=3,
                  log_every=3, checkpoint_every=3, num_val_pairs=4)  # fmt: skip


def test_a_jax_without_pallas_triton_runs_everything_by_xla(tmp_path):
    # Pallas' Triton backend, which our kernels need, is deprecated since jax 0.11: where
    # it is gone, the package still imports, and every layer is XLA's (as here on a CPU).
    out = tmp_path / "grid.npy"
    script = WITHOUT_TRITON.replace("{config}", repr(TOY.to_dict()))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), out],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = train.fit(TOY, tmp_path / "here", shifted_blobs(0, 8), progress=False)
    pairs = shifted_blobs(1, 4)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    grid = register(TOY, variables, pairs[:2], pairs[2:]).grid
    np.testing.assert_array_equal(np.load(out), grid)
