"""Our GPU kernels or XLA's computation of the same, chosen by platform; over several
devices, each device's kernel on its own slice of the batch."""

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import jax
from jax.sharding import NamedSharding, PartitionSpec

try:  # Pallas' Triton backend, which our kernels are written for
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # deprecated in jax 0.11, "to be removed in a future JAX version"
    plgpu = None

_SPLIT = contextvars.ContextVar("split", default=None)


def kernels_off(variable: str) -> bool:
    """Whether our kernels are off: `variable` set to ``xla`` in the environment (each
    family's switch: DIRNET_FIRST_LAYER, DIRNET_POOLED_LAYERS, DIRNET_TRAIN_CONV), or a
    jax without Pallas' Triton backend, where XLA computes every layer (the same values,
    at its speed)."""
    return plgpu is None or os.environ.get(variable, "") == "xla"


@contextlib.contextmanager
def split_over(sharding: NamedSharding) -> Iterator[None]:
    """Kernels traced while the context lasts run once per device of `sharding`'s mesh, on
    that device's slice of the batch (split along the axis `sharding`'s spec names first),
    inside `jax.shard_map`. XLA's partitioner cannot split a kernel's custom call: it would
    gather the whole batch onto every device and run the kernel there. XLA's own
    operations, the `xla` alternatives included, it splits itself."""
    if not isinstance(sharding, NamedSharding) or not sharding.spec or not sharding.spec[0]:
        raise ValueError(f"split_over needs a NamedSharding split along axis 0, got {sharding}")
    token = _SPLIT.set((sharding.mesh, sharding.spec[0]))
    try:
        yield
    finally:
        _SPLIT.reset(token)


def per_device(
    fn: Callable, batched: tuple[bool, ...], summed: bool | tuple[bool, ...]
) -> Callable:
    """`fn` run on each device's slice of the batch inside the current `split_over`
    (`fn` itself outside one).

    batched: for each argument, whether its leading axis is the batch (split) or not
    (every device gets all of it). summed: for the output, or for each output of a tuple,
    whether it is a sum over the batch (each device sums its slice, and the devices'
    sums are added) or has the batch as its leading axis (the slices are joined).
    """
    split = _SPLIT.get()
    if split is None:
        return fn
    mesh, axis = split

    def body(*args):
        out = fn(*args)
        return jax.tree.map(lambda s, o: jax.lax.psum(o, axis) if s else o, summed, out)

    spec = PartitionSpec
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(spec(axis) if b else spec() for b in batched),
        out_specs=jax.tree.map(lambda s: spec() if s else spec(axis), summed),
        check_vma=False,  # Pallas' calls do not say how their outputs vary over devices
    )


def default_platform() -> str:
    """jax's default backend by the name lowering gives it: "cuda" or "rocm" for a GPU (both
    "gpu" to `jax.default_backend()`), else that name ("cpu", "tpu"). `cuda_or_xla`'s
    kernels run on "cuda" alone; on ROCm their XLA alternatives run."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def cuda_or_xla(
    gpu: Callable,
    xla: Callable,
    *args,
    taken: bool = True,
    interpret: bool = False,
    batched: tuple[bool, ...] | None = None,
    summed: bool | tuple[bool, ...] = False,
):
    """``gpu(*args)`` on CUDA GPUs, ``xla(*args)`` on other platforms, both lowered into one
    program (`jax.lax.platform_dependent`). Not `taken` (a shape the kernel does not take):
    XLA's everywhere. `interpret`: the kernel everywhere (in Pallas' interpreter, as `gpu`
    itself is told: the tests off a GPU).

    Inside `split_over`, `gpu` runs on each device's slice (`per_device`; `batched`, by
    default the first argument alone, and `summed` say how the arguments and outputs
    relate to the batch).
    """
    if not taken:
        return xla(*args)
    batched = (True,) + (False,) * (len(args) - 1) if batched is None else batched
    if len(batched) != len(args):
        raise ValueError(f"batched has {len(batched)} entries for {len(args)} arguments")
    gpu = per_device(gpu, batched, summed)
    if interpret:
        return gpu(*args)
    return jax.lax.platform_dependent(*args, cuda=gpu, default=xla)
