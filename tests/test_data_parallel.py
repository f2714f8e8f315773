"""Data parallelism over several (virtual CPU) devices: same trajectory as one device."""

import json
import os
import subprocess
import sys

import numpy as np

from dirnet_jax import DIRNetConfig, train
from dirnet_jax import workdir as wd
from dirnet_jax.toy import shifted_blobs

CONFIG = dict(image_shape=(28, 28), num_downsamplings=2, batch_size=8, learning_rate=1e-3,
              num_steps=30, log_every=10, checkpoint_every=30)  # fmt: skip

FOUR_DEVICES = r"""
import json, re, sys
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
# Each device draws its own slice of the batch's pairs from the pool: [2, 1, 28, 28, 1].
gathered = [int(re.search(r"= f32\[(\d+),", line).group(1)) for line in hlo.splitlines()
            if " gather(" in line and "slice_sizes={1,28,28,1}" in line]
# Our Triton kernels in a 64² step lowered for CUDA, on one device and split over four.
big = config.replace(image_shape=(64, 64))
big_state, big_pool = train.create_train_state(big), jax.numpy.zeros((4, 64, 64, 1))
_, big_split = train.data_parallel(big)
kernels = [train.train_steps.trace(big_state, big_pool, train.data_key(big), steps=1,
                                   batch_size=8, grouped=False, sharding=sharding)
           .lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")
           for sharding in (None, big_split)]
print(json.dumps({"param_devices": len(kernel.sharding.device_set),
                  "all_reduce": "all-reduce" in hlo, "gathered": gathered,
                  "kernels": kernels, "kernel": kernel.ravel().tolist()}))
try:
    train.data_parallel(config.replace(batch_size=6))
except ValueError as err:
    print(err)
"""


def test_four_devices_follow_one(tmp_path):
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "four"), json.dumps(CONFIG)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, error = proc.stdout.strip().splitlines()[-2:]
    report = json.loads(report)
    assert report["param_devices"] == 4  # parameters replicated on every device
    assert report["all_reduce"]  # gradients and BatchNorm statistics are reduced across them
    assert report["gathered"] and set(report["gathered"]) == {8 // 4}  # fixed and moving
    # XLA cannot split a kernel's custom call over devices (it would gather the whole
    # batch onto each): split over four, the step is XLA's alone.
    one_device, four_devices = report["kernels"]
    assert one_device > 0 and four_devices == 0
    assert error == "batch_size 6 does not split over the 4 devices"

    config = DIRNetConfig(**CONFIG)
    one = train.fit(config, tmp_path / "one", shifted_blobs(0, 16), progress=False)
    losses = [[r["train_loss"] for r in wd.read_metrics(tmp_path / d)] for d in ("one", "four")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    np.testing.assert_allclose(
        np.ravel(one.params["output"]["kernel"]), report["kernel"], rtol=1e-3, atol=1e-6
    )
