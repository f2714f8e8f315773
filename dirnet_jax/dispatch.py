"""Our GPU kernels or XLA's computation of the same, chosen by platform."""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

_XLA_ONLY = contextvars.ContextVar("xla_only", default=False)


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """XLA's computation for every `cuda_or_xla` traced while the context lasts (and no
    layer that exists for our kernels alone): for programs that XLA partitions over several
    devices. Its partitioner cannot split a kernel's custom call, so it would gather the
    kernel's whole batch onto every device and run it there; XLA's own operations it
    splits."""
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


def kernels_allowed() -> bool:
    """Not inside `xla_only`."""
    return not _XLA_ONLY.get()


def cuda_or_xla(gpu: Callable, xla: Callable, *args, taken: bool = True, interpret: bool = False):
    """``gpu(*args)`` on CUDA GPUs, ``xla(*args)`` on other platforms, both lowered into one
    program (`jax.lax.platform_dependent`). Not `taken` (a shape the kernel does not take),
    or inside `xla_only`: XLA's everywhere. `interpret`: the kernel everywhere (in Pallas'
    interpreter, as `gpu` itself is told: the tests off a GPU)."""
    if not taken or not (interpret or kernels_allowed()):
        return xla(*args)
    if interpret:
        return gpu(*args)
    return jax.lax.platform_dependent(*args, cuda=gpu, default=xla)
