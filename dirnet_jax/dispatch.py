"""Our GPU kernels or XLA's computation of the same, chosen by platform."""

from collections.abc import Callable

import jax


def cuda_or_xla(gpu: Callable, xla: Callable, *args, taken: bool = True, interpret: bool = False):
    """``gpu(*args)`` on CUDA GPUs, ``xla(*args)`` on other platforms, both lowered into one
    program (`jax.lax.platform_dependent`). Not `taken` (a shape the kernel does not take):
    XLA's everywhere. `interpret`: the kernel everywhere (in Pallas' interpreter, as
    `gpu` itself is told: the tests off a GPU)."""
    if not taken:
        return xla(*args)
    if interpret:
        return gpu(*args)
    return jax.lax.platform_dependent(*args, cuda=gpu, default=xla)
