"""benchmarks.sass: the Triton IR it captures, its occupancy and issue model, its SASS
counts; and, where a Python with triton is at hand (this venv, or DIRNET_TRITON_PYTHON),
one kernel compiled for sm_90a."""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import sass, triton_sass
from dirnet_jax import first_layer, first_layer_grad, pooled_layers, train_conv

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/              @!P0 FFMA.FTZ R2, R3, R4, R5 ;
        /*0030*/               @P1 MUFU.EX2 R6, R7 ;
        /*0040*/                   HGMMA.64x16x8.F32.TF32 gdesc[UR4], RZ, !UPT ;
        /*0050*/                   EXIT ;
        .L_x_0:
"""


def test_counts_opcodes_of_a_listing():
    counts = triton_sass.count_sass(LISTING)
    assert counts == {"LDC": 1, "FFMA": 2, "MUFU": 1, "HGMMA": 1, "EXIT": 1}
    assert triton_sass.loop_instructions(LISTING) == 0  # straight-line code


LOOP = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   FFMA R2, R3, R4, R2 ;
        /*0030*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0040*/                   ISETP.GE.AND P0, PT, R5, 0x8, PT ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""


def test_finds_a_loop_by_its_backward_branch():
    # 0x20 … 0x50: four instructions run per trip; the last BRA (to itself) is no loop.
    assert triton_sass.loop_instructions(LOOP) == 4
    counts = triton_sass.count_sass(LOOP)
    sass_counts = {"instructions": sum(counts.values()), "loop": 4, "registers": 8,
                   "local": 0, "shared": 0, "opcodes": dict(counts)}  # fmt: skip
    once, looped = sass.row("k", 528, 1, sass_counts), sass.row("k", 528, 1, sass_counts, trips=8)
    assert once["instructions"] == 8 and looped["instructions"] == 8 + 4 * 7
    assert looped["issue_floor_ms"] == pytest.approx(once["issue_floor_ms"] * 36 / 8)


def test_resident_warps_and_issue_floor_by_hand():
    # 80 registers × 32 threads × 8 warps = 20,480 of 65,536: 3 programs, 24 warps.
    assert sass.resident_warps(80, 8, 0) == 24
    # 94 → 96 registers: 12,288 per 4-warp program, 5 fit; 18 KB shared would allow 11.
    assert sass.resident_warps(94, 4, 18432) == 20
    # Shared memory binds: 100 KB per program, 2 fit.
    assert sass.resident_warps(32, 4, 100 * 1024) == 8
    assert sass.resident_warps(16, 1, 0) == 32  # at most 32 programs per SM
    # 528 schedulers at 1.98 GHz issue 1.045e12 warp instructions a second.
    assert sass.issue_floor_ms(528, 1, 1_980_000) == pytest.approx(1.0)


def test_captures_each_kernels_ir_grid_and_warps():
    x = jax.ShapeDtypeStruct((4, 64, 64, 2), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 2, 16), jnp.float32)
    b = jax.ShapeDtypeStruct((16,), jnp.float32)

    def both(x, k, b):
        first = first_layer.conv_elu_pool2_gpu(x, k, b, "avg")  # [4, 32, 32, 16]
        kernel16 = jnp.ones((3, 3, 16, 16), jnp.float32)
        return pooled_layers.conv_elu_pool2_dense(first, kernel16, b, "max")

    kernels = sass.triton_kernels(both, x, k, b)
    assert [(programs, warps) for _, programs, warps in kernels] == [
        (4 * 32 // first_layer.ROWS, first_layer.WARPS),
        (4 * 16, pooled_layers.WARPS),
    ]
    assert all("tt.func" in ir and "tt.load" in ir for ir, _, _ in kernels)
    # Both on tensor cores by default: the first layer's window matrix (`dot1`) and the
    # 128² layer's taps, one TF32 product each.
    assert all("tt.dot" in ir and "inputPrecision = tf32" in ir for ir, _, _ in kernels)
    assert sass.triton_kernels(lambda x: x * 2, x) == []  # XLA's own: none


def test_captures_the_training_kernels_and_their_loop():
    x = jax.ShapeDtypeStruct((2, 12, 64, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)
    g = jax.ShapeDtypeStruct((2, 12, 64, 32), jnp.float32)

    def grads(x, k, g):
        return jax.vjp(train_conv.conv3x3, x, k)[1](g)

    kernels = sass.triton_kernels(lambda x, k, g: (train_conv.conv3x3(x, k), grads(x, k, g)),
                                  x, k, g)  # fmt: skip
    rows = math.gcd(12, train_conv.ROWS)  # 4: 12 rows, 3 programs per image
    assert [(programs, warps) for _, programs, warps in kernels] == [
        (2 * 12, train_conv.WARPS),  # the conv: a program per row
        (2 * 12, train_conv.WARPS),  # its input gradient
        (2 * 12 // rows, train_conv.GRAD_WARPS),  # its kernel gradient
    ]
    assert "scf.for" in kernels[2][0] and "scf.for" not in kernels[0][0]
    # The kernel gradient's loop: rows per program × blocks of columns per row.
    assert sass.kernel_grad_trips("triton conv and gradients", 12, 64) == rows * 64 // min(
        64, train_conv.BLOCK
    )
    assert sass.kernel_grad_trips("…, kernel grad rows=8 block=128 warps=4", 12, 64) == 4
    assert sass.kernel_grad_trips("…, kernel grad rows=2 block=16 warps=1", 12, 64) == 8
    # first_layer_grad's, over pooled rows and columns: by default one trip (block 0: all).
    one_row = first_layer_grad.GRAD_SHAPES[0][:2]
    assert sass.kernel_grad_trips("at once (first_layer_grad's kernels)", 6, 64, one_row) == 1
    assert sass.kernel_grad_trips("at once, kernel grad rows=4 block=32", 6, 64, one_row) == 4


def test_says_when_triton_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="/bin/false has no triton"):
        sass.main(["--triton_python=/bin/false", f"--out={tmp_path / 'sass.json'}"])
    assert not (tmp_path / "sass.json").exists()


TRITON_PYTHON = os.environ.get("DIRNET_TRITON_PYTHON", sys.executable)


@pytest.mark.skipif(not sass.triton_available(TRITON_PYTHON), reason="no triton==3.9.0 here")
def test_compiles_the_pooled_kernel_for_sm90():
    x = jax.ShapeDtypeStruct((1, 4, 128, 16), jnp.float32)  # 64 rows: Hopper's HGMMA
    k = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    b = jax.ShapeDtypeStruct((16,), jnp.float32)
    ((ir, programs, warps),) = sass.triton_kernels(
        lambda x, k, b: pooled_layers.conv_elu_pool2_dense(x, k, b, "avg"), x, k, b
    )
    got = sass.compile_sass(ir, warps, TRITON_PYTHON)
    json.dumps(got)
    # 9 taps × 4 positions of a pooling window, 3 TF32 products each, 2 HGMMAs of k=8 per
    # 16-channel product: 216, and the sums accumulated in the HGMMAs (no add per term).
    assert got["opcodes"]["HGMMA"] == 216
    assert got["instructions"] < 3000 and got["local"] == 0 and 0 < got["registers"] <= 255
    row = sass.row("pooled", programs, warps, got)
    assert row["tensor"] == 216 and row["resident_warps"] % warps == 0
