"""What a number was measured on: written beside every timing we report."""

from __future__ import annotations

import os
import platform
import sys
import time

import jax


def describe() -> dict[str, str | int]:
    device = jax.devices()[0]
    return {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count() or 0,
        "cpu": host_cpu(),
        "cpu_vector": cpu_vector(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "malloc": malloc(),
        "date": time.strftime("%Y-%m-%d"),
    }


CACHING_MALLOCS = ("tcmalloc", "jemalloc", "mimalloc")


def malloc() -> str:
    """The allocator this process runs on: "tcmalloc", "jemalloc" or "mimalloc" when one is
    loaded (``LD_PRELOAD``), else "system".

    It matters for CPU timings of large images: glibc's malloc hands blocks over 32 MiB
    back to the kernel on free, so XLA:CPU and PyTorch fault every call's temporaries in
    afresh (benchmarks/NOTES.md)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # not Linux
        return "system"
    return next((name for name in CACHING_MALLOCS if f"lib{name}" in maps), "system")


def malloc_advice(image_size: int) -> str | None:
    """One line for CPU training of images of 128² and more under the system's malloc,
    where tcmalloc makes a step 1.1–1.7× faster (README, Speed); None otherwise."""
    linux = sys.platform.startswith("linux")  # LD_PRELOAD as written
    if not linux or jax.default_backend() != "cpu" or image_size < 128 or malloc() != "system":
        return None
    return (
        "note: CPU training at this size runs 1.1-1.7x faster with tcmalloc preloaded: "
        "LD_PRELOAD=libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 (README, Speed)"
    )


def host_cpu() -> str:
    """This machine's processor and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count() or 0} cores"


VECTOR_FLAGS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")


def cpu_vector() -> str:
    """The widest vector extension of the host CPU that XLA:CPU compiles for: "avx512f",
    "avx2", … from /proc/cpuinfo's flags; "" where unknown.

    Host-CPU timings depend on the processor: the same 28² training step ran 445 steps/s
    on the 2-core CPU of the sessions up to 2026-11-27 (its model and extensions were not
    recorded) and 150 on a 2-core AMD EPYC with AVX2 (benchmarks/NOTES.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return ""
    flags = set(line.partition(":")[2].split())
    return next((flag for flag in VECTOR_FLAGS if flag in flags), "")


def timed_on() -> str:
    """Where JAX runs: the accelerator's name, or the host CPU."""
    if jax.default_backend() == "cpu":
        return host_cpu()
    return jax.devices()[0].device_kind
