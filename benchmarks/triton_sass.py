"""Compile one Triton IR file (as Pallas emits it) to sm_90a machine code with the `triton`
compiler, and count what the machine code holds. Imports only triton and the standard
library, so it runs under any Python that has ``triton==3.9.0``:

    python benchmarks/triton_sass.py KERNEL.ttir WARPS      # prints one JSON object

`benchmarks.sass` calls it for every kernel. No GPU is needed: Triton compiles for a named
target, and its wheel carries ptxas and cuobjdump. The passes are Triton 3.9's, run from
its TTIR stage (inliner, canonicalize, combine, ...), as XLA runs its own Triton's on the
device; registers and counts there may differ a little.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ARCH = 90  # sm_90a: H100, H200
# One SASS instruction line: "/*0a40*/  @!P0 FFMA R1, R2, R3, R4 ;" → opcode FFMA.
SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def count_sass(listing: str) -> collections.Counter:
    """Opcode (without modifiers) → instructions, from `cuobjdump -sass` output."""
    return collections.Counter(m.group(1) for m in map(SASS_LINE.match, listing.splitlines()) if m)


BRANCH = re.compile(
    r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]\s+)?BRA\s+0x([0-9a-f]+)", re.MULTILINE
)
INSTRUCTION_BYTES = 16  # every sm_90 instruction


def loop_instructions(listing: str) -> int:
    """Instructions in the largest loop of a `cuobjdump -sass` listing (from a backward
    branch's target to the branch; 0 if none): what runs once per trip."""
    spans = [int(at, 16) - int(to, 16) for at, to in BRANCH.findall(listing)]
    return max((span // INSTRUCTION_BYTES + 1 for span in spans if span > 0), default=0)


def compile_ttir(path: str, warps: int) -> dict:
    """{registers, stack, shared, local, instructions, opcodes, loop} of the kernel in
    `path` (loop: instructions in its loop, `loop_instructions`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler

    target = GPUTarget("cuda", ARCH, 32)
    backend = type(compiler.make_backend(target))
    add_stages = backend.add_stages

    # triton.compile skips the passes of an IR file's own stage; Pallas' TTIR is raw (its
    # accumulations not yet folded into the dots), so start one stage earlier.
    def with_raw_stage(self, stages, options, language):
        stages["raw"] = lambda module, metadata: module
        add_stages(self, stages, options, language)

    class RawTTIR(compiler.IRSource):
        def __init__(self, *args):
            super().__init__(*args)
            self.ext = "raw"

    backend.add_stages, compiler.IRSource = with_raw_stage, RawTTIR
    kernel = triton.compile(path, target=target, options={"num_warps": warps, "num_stages": 1})
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _run(tools / "cuobjdump", "-res-usage", cubin)
        listing = _run(tools / "cuobjdump", "-sass", cubin)
    registers, stack, shared, local = map(int, RESOURCES.search(usage).groups())
    opcodes = count_sass(listing)
    return dict(registers=registers, stack=stack, shared=max(shared, kernel.metadata.shared),
                local=local, instructions=sum(opcodes.values()), opcodes=dict(opcodes),
                loop=loop_instructions(listing))  # fmt: skip


def _run(*command) -> str:
    return subprocess.run(
        list(map(str, command)), check=True, capture_output=True, text=True
    ).stdout


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/triton_sass.py KERNEL.ttir WARPS")
    print(json.dumps(compile_ttir(sys.argv[1], int(sys.argv[2]))))
