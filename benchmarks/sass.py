"""What our Triton kernels compile to on an H100/H200 (sm_90a), without a GPU: every kernel
`benchmarks.layers` times, lowered here for CUDA, compiled by the `triton` compiler, and
counted. A static table, not a timing: it says where instructions, registers and spills
go before a device lease, and why a form is slower after one.

    python -m benchmarks.sass                       # 256², batch 512 (the GPU table's shape)
    python -m benchmarks.sass --triton_python=/path/to/venv/bin/python

Needs ``triton==3.9.0`` (``pip install -e '.[sass]'``, about 1 GB, so not in `make
install`), in this venv or in the Python that --triton_python names. Columns per kernel:
instructions run per thread (the inference kernels are straight-line code; a training
kernel's loop body, found by its backward branch, counts once per trip), registers,
local memory (spills), shared memory, resident warps per SM those allow, the issue floor
(every warp's instructions at one per scheduler per cycle on an H200: 132 SMs × 4 at
1.98 GHz), and the float32 ALU (FFMA/FADD/FMUL), tensor-core (HGMMA), global-load (LDG)
and special-function (MUFU) instructions in the code (each once).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from benchmarks import core, layers
from dirnet_jax import machine, train_conv
from dirnet_jax.train_conv import BLOCK, ROWS
from dirnet_jax.workdir import atomic_write_text

FLAGS = {"size": "256", "batch": "512", "train_batch": "32", "triton_python": "", "out": ""}
# An H200: SMs, schedulers per SM, boost clock; and the sm_90 limits per SM.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
REGISTERS, MAX_WARPS, MAX_BLOCKS, SHARED = 65536, 64, 32, 228 * 1024
COMPILER = Path(__file__).with_name("triton_sass.py")


@contextlib.contextmanager
def captured_triton_ir():
    """Within: every Pallas Triton kernel lowered appends (TTIR text, grid) to the list."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    kernels = []

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        kernels.append((result.module.operation.get_asm(), tuple(result.grid)))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield kernels
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def triton_kernels(fn, *args) -> list[tuple[str, int, int]]:
    """[(TTIR, programs, warps)] of the Triton kernels in `fn`, lowered for CUDA here."""
    with captured_triton_ir() as kernels:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    warps = [int(n) for n in re.findall(r"num_warps = (\d+) : i32", text)]
    return [(ir, math.prod(grid), w) for (ir, grid), w in zip(kernels, warps, strict=True)]


def resident_warps(registers: int, warps: int, shared: int) -> int:
    """Warps per SM of a kernel with `registers` per thread, `warps` per program and
    `shared` bytes per program (registers are allocated 8 per thread at a time)."""
    per_program = math.ceil(registers / 8) * 8 * 32 * warps
    programs = min(MAX_BLOCKS, MAX_WARPS // warps, REGISTERS // per_program)
    if shared:
        programs = min(programs, SHARED // (shared + 1024))  # 1 KB reserved per program
    return programs * warps


def issue_floor_ms(programs: int, warps: int, instructions: int) -> float:
    """Milliseconds to issue every warp's instructions at one per scheduler per cycle."""
    return programs * warps * instructions / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3


def compile_sass(ttir: str, warps: int, python: str) -> dict:
    """`triton_sass.compile_ttir` in a separate process (Triton and jaxlib each carry MLIR)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")  # FMA contraction, as XLA's
        done = subprocess.run([python, str(COMPILER), str(path), str(warps)],
                              capture_output=True, text=True, env=env)  # fmt: skip
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no message"])[-1])
    return json.loads(done.stdout)


def row(name: str, programs: int, warps: int, sass: dict, trips: int = 1) -> dict:
    """A table row; `trips`: times the kernel's loop runs (its `loop` instructions run that
    many times, the rest once)."""
    ops = sass["opcodes"]
    instructions = sass["instructions"] + sass.get("loop", 0) * (trips - 1)  # run per thread
    return dict(
        kernel=name, programs=programs, warps=warps, instructions=instructions, trips=trips,
        static_instructions=sass["instructions"], loop_instructions=sass.get("loop", 0),
        registers=sass["registers"], local_bytes=sass["local"], shared_bytes=sass["shared"],
        resident_warps=resident_warps(sass["registers"], warps, sass["shared"]),
        issue_floor_ms=issue_floor_ms(programs, warps, instructions),
        fp32=sum(ops.get(op, 0) for op in ("FFMA", "FADD", "FMUL")),
        tensor=ops.get("HGMMA", 0) + ops.get("HMMA", 0), ldg=ops.get("LDG", 0),
        mufu=ops.get("MUFU", 0), opcodes=ops,
    )  # fmt: skip


def kernel_grad_trips(
    name: str, height: int, width: int, defaults: tuple[int, int] | None = None
) -> int:
    """Times a kernel gradient's loop runs over a [height, width] image (its rows, its
    columns a block at a time), for an implementation named as benchmarks.layers names it
    ("… rows=R block=N …"), else `defaults` (rows, block; block 0: every column), those of
    `train_conv.kernel_grad_gpu` if None."""
    shape = re.search(r"rows=(\d+) block=(\d+)", name)
    rows, block = map(int, shape.groups()) if shape else defaults or (ROWS, BLOCK)
    return math.gcd(height, rows) * (width // min(width, block or width))


def triton_available(python: str) -> bool:
    done = subprocess.run([python, "-c", "import triton"], capture_output=True)
    return done.returncode == 0


def main(argv: list[str]) -> None:
    opts = core.parse_options(argv, FLAGS, __doc__)
    out = core.output_path(opts["out"], "sass")
    python = opts["triton_python"] or sys.executable
    if not triton_available(python):
        sys.exit(f"error: {python} has no triton: pip install triton==3.9.0 (or -e '.[sass]')")
    size, batch = int(opts["size"]), int(opts["batch"])
    train_batch = int(opts["train_batch"])
    rows = []
    print(f"{'kernel':60} {'instr':>6} {'regs':>4} {'spill':>5} {'smem':>6} {'warps/SM':>8} "
          f"{'issue ms':>8} {'fp32':>5} {'tensor':>6} {'ldg':>4} {'mufu':>4}")  # fmt: skip
    taps = (train_conv.TAPS_ROWS, train_conv.TAPS_BLOCK)  # the kernel gradients' defaults
    for layer in layers.LAYERS:
        train = layer.startswith("train")
        shapes = layers.layer_shapes(layer, size, train_batch if train else batch)
        args = [jax.ShapeDtypeStruct(shape, "float32") for shape in shapes]
        for name, fn in layers.IMPLS[layer](on_gpu=True).items():
            # Training: the conv, its input gradient, its kernel gradient (a loop over
            # blocks of columns of the program's rows); inference: the layer's kernel.
            parts = {"": 1}
            if layer == "train1bn" and name.startswith("at once"):
                half = (shapes[0][1] // 2, shapes[0][2] // 2)  # pooled rows and columns
                trips = kernel_grad_trips(name, *half)
                parts = {**dict.fromkeys(["stats", "forward", "backward sums"], 1),
                         "kernel grad": trips}  # fmt: skip
            elif layer in ("train1", "train1bn"):  # the first conv's kernel gradient
                parts = {"kernel grad": kernel_grad_trips(name, *shapes[0][1:3], taps)}
            elif train and "pairs" in name:  # its loop over pairs of columns
                h, w = shapes[0][1:3]
                pairs = (train_conv.PAIRS_ROWS, train_conv.PAIRS_BLOCK)
                trips = kernel_grad_trips(name, h, w // 2, pairs)
                parts = {"conv": 1, "input grad": 1, "kernel grad": trips}
            elif train:
                trips = kernel_grad_trips(name, *shapes[0][1:3])
                parts = {"conv": 1, "input grad": 1, "kernel grad": trips}
            try:
                kernels = triton_kernels(fn, *args)
                if not kernels:  # one of XLA's own rows
                    continue
                found = [
                    row(f"layer {layer}: {name}{': ' * bool(part)}{part}", programs, warps,
                        compile_sass(ttir, warps, python), trips=trips)
                    for (ttir, programs, warps), (part, trips) in zip(
                        kernels[: len(parts)], parts.items(), strict=True)
                ]  # fmt: skip
            except Exception as err:  # a form Triton refuses: say so and go on
                print(f"failed: {name}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            for r in found:
                rows.append(r)
                print(f"{r['kernel']:60} {r['instructions']:6} {r['registers']:4} "
                      f"{r['local_bytes']:5} {r['shared_bytes']:6} {r['resident_warps']:8} "
                      f"{r['issue_floor_ms']:8.3f} {r['fp32']:5} {r['tensor']:6} "
                      f"{r['ldg']:4} {r['mufu']:4}", flush=True)  # fmt: skip
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"{size}² images, batch {batch} (training {train_batch}); sm_90a by triton {version}; "
          "issue floor on an H200; instr: run per thread, a loop's body once per trip")  # fmt: skip
    record = dict(machine=machine.describe(), size=size, batch=batch, train_batch=train_batch,
                  triton=version, rows=rows)  # fmt: skip
    atomic_write_text(out, json.dumps(record, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
