"""Data parallelism over several (virtual CPU) devices: same trajectory as one device."""

import json
import subprocess
import sys

import numpy as np

from dirnet_jax import DIRNetConfig, train
from dirnet_jax import workdir as wd
from dirnet_jax.toy import shifted_blobs
from tests import conftest

CONFIG = dict(image_shape=(28, 28), num_downsamplings=2, batch_size=8, learning_rate=1e-3,
              num_steps=30, log_every=10, checkpoint_every=30)  # fmt: skip

FOUR_DEVICES = r"""
import json, math, re, sys
import jax
from dirnet_jax import DIRNetConfig, train
from dirnet_jax.toy import shifted_blobs
assert jax.device_count() == 4, jax.devices()
config = DIRNetConfig(**json.loads(sys.argv[2]))
state = train.fit(config, sys.argv[1], shifted_blobs(0, 16), progress=False)
kernel = state.params["output"]["kernel"]
_, split = train.data_parallel(config)
pool = jax.numpy.zeros((4, 28, 28, 1))
hlo = train.train_steps.lower(state, pool, train.data_key(config), steps=1, batch_size=8,
                              grouped=False, sharding=split).compile().as_text()
# Each device draws its own slice of the batch's pairs from the pool: 2 images of 28², as
# [2, 1, 28, 28, 1] or [1, 2, 28, 28, 1] (XLA's two loop emitters canonicalize otherwise).
gathered = [math.prod(map(int, re.search(r"= f32\[([\d,]+)\]", line).group(1).split(",")))
            // 28**2 for line in hlo.splitlines()
            if " gather(" in line and "slice_sizes={1,28,28,1}" in line]
# Our Triton kernels in a 64² step lowered for CUDA, on one device and split over four:
# the batch each kernel call reads (its first operand's leading axis).
big = config.replace(image_shape=(64, 64))
big_state, big_pool = train.create_train_state(big), jax.numpy.zeros((4, 64, 64, 1))
_, big_split = train.data_parallel(big)
kernels = [[int(re.search(r": \(tensor<(\d+)x", line).group(1)) for line in
            train.train_steps.trace(big_state, big_pool, train.data_key(big), steps=1,
                                    batch_size=8, grouped=False, sharding=sharding)
            .lower(lowering_platforms=("cuda",)).as_text().splitlines()
            if "xla.gpu.triton" in line]
           for sharding in (None, big_split)]
# The benchmark's scaling row: fit's steps over the four devices, 32 pairs each.
from benchmarks import core
core.MIN_SECONDS, table = 0.0, core.Table()
core.bench_train_steps(table, "baseline", config, pool, 1, 2, over_devices=True)
(row,) = table.rows
print(json.dumps({"param_devices": len(kernel.sharding.device_set),
                  "all_reduce": "all-reduce" in hlo, "gathered": gathered,
                  "kernels": kernels, "kernel": kernel.ravel().tolist(),
                  "bench": [row["what"], row["unit"], row["per_sec"]]}))
try:
    train.data_parallel(config.replace(batch_size=6))
except ValueError as err:
    print(err)
"""


def test_four_devices_follow_one(tmp_path):
    env = conftest.virtual_devices(4)
    cmd = [sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "four"), json.dumps(CONFIG)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, error = proc.stdout.strip().splitlines()[-2:]
    report = json.loads(report)
    assert report["param_devices"] == 4  # parameters replicated on every device
    assert report["all_reduce"]  # gradients and BatchNorm statistics are reduced across them
    assert report["gathered"] and set(report["gathered"]) == {8 // 4}  # fixed and moving
    # XLA cannot split a kernel's custom call over devices (it would gather the whole
    # batch onto each): split over four, each device's kernels read its quarter.
    one_device, four_devices = report["kernels"]
    assert one_device and set(one_device) == {8} and four_devices == [2] * len(one_device)
    assert error == "batch_size 6 does not split over the 4 devices"
    what, unit, rate = report["bench"]
    assert (what, unit) == ("train, 4 devices, batch 128", "pairs/s") and rate > 0

    config = DIRNetConfig(**CONFIG)
    one = train.fit(config, tmp_path / "one", shifted_blobs(0, 16), progress=False)
    losses = [[r["train_loss"] for r in wd.read_metrics(tmp_path / d)] for d in ("one", "four")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    np.testing.assert_allclose(
        np.ravel(one.params["output"]["kernel"]), report["kernel"], rtol=1e-3, atol=1e-6
    )


KERNELS_SPLIT = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from dirnet_jax import dispatch, layers, train_conv
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
split = NamedSharding(mesh, PartitionSpec("data"))
rng = np.random.default_rng(0)
def normal(*shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
cases = {  # each kernel's call (interpreted), its arguments (the batch first)
    "first_layer_train": (functools.partial(
        layers.first_layer_train, downsampling="avg", conv=layers.conv_taps,
        dtype=jnp.float32, interpret=True, passes=3),
        (normal(8, 16, 32, 2), normal(3, 3, 2, 16, scale=0.5), normal(16) + 2, normal(16))),
    "conv3x3": (functools.partial(train_conv.conv3x3, interpret=True),
                (normal(8, 4, 16, 16), normal(3, 3, 16, 16, scale=0.2))),
    "taps_grad": (train_conv.with_taps_grad(layers.conv_taps, interpret=True),
                  (normal(8, 8, 16, 2), normal(3, 3, 2, 16))),
    "pooled_conv": (functools.partial(layers.pooled_conv, downsampling="max",
                                      dtype=jnp.float32, interpret=True),
                    (normal(8, 2, 256, 16), normal(3, 3, 16, 16, scale=0.2), normal(16))),
}
report = {}
for name, (layer, args) in cases.items():
    def run(*args):  # the outputs, and the gradients where the layer trains
        if name == "pooled_conv":
            return layer(*args)
        loss = lambda *a: sum(jnp.sin(o).sum() for o in jax.tree.leaves(layer(*a)))
        return layer(*args), jax.grad(loss, range(len(args)))(*args)
    expected = jax.jit(run)(*args)
    placed = (jax.device_put(args[0], split), *args[1:])
    with dispatch.split_over(split):
        calls = str(jax.make_jaxpr(run)(*placed)).count("shard_map[")
        got = jax.jit(run)(*placed)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    error = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in pairs)
    report[name] = [calls, error]
print(json.dumps(report))
"""


def test_each_device_runs_our_kernels_on_its_slice():
    # Inside dispatch.split_over, each kernel (interpreted here) runs in a shard_map on its
    # device's quarter of the batch; its sums over the batch (statistics, kernel
    # gradients) are added over the devices. Values and gradients as on one device.
    env = conftest.virtual_devices(4)
    proc = subprocess.run([sys.executable, "-c", KERNELS_SPLIT], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"first_layer_train", "conv3x3", "taps_grad", "pooled_conv"}
    for name, (calls, error) in report.items():
        assert calls > 0 and error < 1e-5, name
