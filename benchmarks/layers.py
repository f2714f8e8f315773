"""A layer of the regressor alone, at inference conv 3×3 + ELU + 2×2 pooling, in training
the convolution and its gradients: our Triton kernels against what XLA does with the same.

    python -m benchmarks.layers                     # the first layer, 256², batch 512 (GPU)
    python -m benchmarks.layers --layer=2           # the second (16 → 16 channels at 128²)
    python -m benchmarks.layers --layer=train       # the second's conv in training, batch 32
    python -m benchmarks.layers --layer=train1      # the first conv in training, batch 32
    python -m benchmarks.layers --size=64 --batch=2 --min_seconds=0.1  # a CPU smoke run

Layer 1 (2 → 16 channels): dirnet_jax.first_layer in several forms against XLA's loop and
XLA's unfused layer. Layer 2: dirnet_jax.pooled_layers against XLA's convolution, ELU and
pooling (`dirnet_jax.layers.xla_pooled_conv`), with one TF32 product per tap (as
registration runs it on CUDA) and with three (float32). Training (the second layer's
convolution, its input gradient and its kernel gradient, as one `jax.vjp`; batch 32 unless
`--batch` says otherwise): dirnet_jax.train_conv against XLA's convolution and gradients
(cuDNN), with one TF32 product per tap and with three. `--layer=train1`, the first conv in
training (`dirnet_jax.layers.conv_taps` and its kernel gradient, at `--size`; what trains
when the first layer is layer by layer): XLA's kernel gradient (cuDNN's) against
`train_conv.taps_kernel_grad_gpu`. `--layer=train1bn`, the first layer with its BatchNorm,
ELU and pooling: layer by layer against at once (`dirnet_jax.layers.first_layer_train`, as
training runs it on CUDA). `--size` is the image size (the second layer's input is half of
it). Rows: each implementation's median time per call, the bandwidth that time implies for
the bytes a perfect kernel moves (the input read once, the pooled output written once),
and the largest difference from XLA's version. Triton first-layer rows are named by the
kernel's form, rows and warps per program, and ELU's expm1 ("exp": as exp − 1; "exp2": by
exp2; "no expm1": left out, wrong values on purpose, to show what it costs). "copy" reads
and writes the input once (its own bytes): the bandwidth ceiling. Off a GPU the Triton
rows run in Pallas' interpreter.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import core
from dirnet_jax import (
    first_layer,
    first_layer_grad,
    machine,
    models,
    pooled_layers,
    train_conv,
)
from dirnet_jax import layers as dirnet_layers
from dirnet_jax.workdir import atomic_write_text

FLAGS = {"size": "256", "batch": "", "layer": "1", "min_seconds": "", "out": ""}
LAYERS = ("1", "2", "train", "train1", "train1bn")
# (form, rows, warps, expm1) of the Triton kernel: the default first (run 7, batch 512:
# `dot1` at 4 warps 0.87 ms), then the default until then (broadcast, 8 warps: 1.31),
# `dot` (three products, training's forward: 1.12), and `dot1` at warps no lease has
# timed. Slower in run 7: broadcast or unpadded by exp2 1.28 and 1.20, `dot` at 8 warps
# 1.29; in run 5 (benchmarks/NOTES.md) broadcast expm1 1.648, 16 warps 1.393, unpadded
# exp 1.315, 4 warps 1.438, a scalar form (since removed) 1.824.
SHAPES = [
    (first_layer.FORM, first_layer.ROWS, first_layer.WARPS, first_layer.EXPM1),
    ("broadcast", 1, 8, "exp"),
    ("dot", 1, 4, "exp"),
    ("dot1", 1, 2, "exp"),
    ("dot1", 1, 8, "exp"),
]
# The kernel gradient's (rows, columns, warps) per program besides the default
# (train_conv.ROWS, BLOCK, GRAD_WARPS), for the training layer.
GRAD_SHAPES = [(8, 32, 1), (2, 32, 1), (4, 16, 2), (4, 64, 1), (8, 128, 4)]
# The pairs form's kernel gradient besides its default (4 rows, 32 pairs, 4 warps): sm_90a
# issue floors at 128² 6.9 and 11.7 µs against the default's 8.6 (benchmarks/NOTES.md).
PAIRS_GRAD_SHAPES = [(4, 64, 4), (4, 32, 8)]
# The same for the first conv's (train_conv.TAPS_ROWS, TAPS_BLOCK, TAPS_WARPS).
TAPS_GRAD_SHAPES = [(4, 64, 8), (4, 32, 2), (8, 32, 4), (4, 128, 4)]
# Off a GPU (Pallas' interpreter, slow): the default and one of each other form.
CPU_SHAPES = [SHAPES[0], ("unpadded", 1, 8, "exp"), ("dot", 1, 4, "exp")]


def parse(argv: list[str]) -> dict[str, str]:
    opts = core.parse_options(argv, FLAGS, __doc__)
    if opts["layer"] not in LAYERS:
        sys.exit(f"error: --layer is one of {', '.join(LAYERS)}, not {opts['layer']!r}")
    opts["batch"] = opts["batch"] or ("32" if opts["layer"].startswith("train") else "512")
    if not opts["batch"].isdigit() or int(opts["batch"]) < 1:
        sys.exit(f"error: --batch is a positive integer, not {opts['batch']!r}")
    if not opts["size"].isdigit() or int(opts["size"]) % 4 or int(opts["size"]) == 0:
        # the first layer pools its input, the second its half
        sys.exit(f"error: --size is a positive multiple of 4, not {opts['size']!r}")
    core.check_seconds(opts, ("min_seconds",))
    return opts


def first_layer_impls(on_gpu: bool) -> dict:
    """{name: jitted fn(x, kernel, bias)} for the first layer; XLA's loop first."""

    def triton(form, rows, warps, expm1):
        return jax.jit(
            lambda x, k, b: first_layer.kernel_call(
                x, k, b, "avg", jnp.float32, rows, warps, not on_gpu, form, expm1
            )
        )

    impls = {
        "xla loop": jax.jit(lambda x, k, b: dirnet_layers.conv_elu_pool2(x, k, b, "avg")),
        "xla unfused": jax.jit(
            lambda x, k, b: core.unfused_first_layer(x, k, b, "avg", jnp.float32)
        ),
    }
    for form, rows, warps, expm1 in SHAPES if on_gpu else CPU_SHAPES:
        name = f"triton {form} rows={rows} warps={warps} {expm1}"
        impls[name] = triton(form, rows, warps, first_layer.EXPM1S[expm1])
    form, rows, warps, _ = SHAPES[0]
    impls[f"triton {form} rows={rows} warps={warps} no expm1"] = triton(
        form, rows, warps, lambda y: y
    )
    return impls


# (TF32 products, warps per program) of `pooled_layers`: as `dirnet_jax.layers.pooled_conv` runs it
# (run 7: 0.90 ms with one product, 1.42 with three), and at 2 warps (run 7: 1.21; 8
# warps 1.67).
POOLED_SHAPES = [(1, pooled_layers.WARPS), (3, pooled_layers.WARPS), (1, 2)]


def pooled_kernel(passes: int, warps: int, on_gpu: bool):
    """(name, jitted fn(x, kernel, bias)): `pooled_layers`' kernel, interpreted off a GPU."""
    name = f"triton, {passes} TF32 product{'s' * (passes > 1)}, warps={warps}"
    options = dict(passes=passes, interpret=not on_gpu, num_warps=warps)
    fn = jax.jit(lambda x, k, b: pooled_layers.conv_elu_pool2_dense(x, k, b, "avg", **options))
    return name, fn


def pooled_layer_impls(on_gpu: bool) -> dict:
    """{name: jitted fn(x, kernel, bias)} for a later layer; XLA's first."""
    return {
        "xla conv, elu, pool": jax.jit(
            lambda x, k, b: dirnet_layers.xla_pooled_conv(x, k, b, "avg", jnp.float32)
        ),
        **dict(pooled_kernel(*shape, on_gpu) for shape in POOLED_SHAPES),
    }


def with_grads(conv, input_grad: bool = True):
    """jitted fn(x, kernel, g) → (conv(x, kernel), its input gradient (if `input_grad`) and
    its kernel gradient for the output gradient g)."""

    def fn(x, kernel, g):
        y, vjp = jax.vjp(conv, x, kernel)
        dx, dw = vjp(g)
        return (y, dx, dw) if input_grad else (y, dw)

    return jax.jit(fn)


def train_conv_impls(on_gpu: bool) -> dict:
    """{name: jitted fn(x, kernel, g) → (conv, input gradient, kernel gradient)} for a later
    layer's convolution in training; XLA's first."""
    grads = with_grads

    def triton(passes, *grad_shape, form="taps"):
        options = dict(interpret=not on_gpu, passes=passes, grad_shape=grad_shape, form=form)
        return grads(functools.partial(train_conv.conv3x3, **options))

    impls = {
        "xla conv and gradients": grads(train_conv.xla_conv),
        "triton conv and gradients, 1 TF32 product": triton(1),
        "triton conv and gradients, 3 TF32 products": triton(3),
        # The conv and the input gradient in the pairs form (untimed).
        "triton pairs conv and gradients, 1 TF32 product": triton(1, form="pairs"),
    }
    for shape in GRAD_SHAPES if on_gpu else []:  # the kernel gradient's other shapes
        name = "triton, 1 TF32 product, kernel grad rows={} block={} warps={}".format(*shape)
        impls[name] = triton(1, *shape)
    for shape in PAIRS_GRAD_SHAPES if on_gpu else []:  # and the pairs form's
        name = "triton pairs, 1 TF32 product, kernel grad rows={} block={} warps={}"
        impls[name.format(*shape)] = triton(1, *shape, form="pairs")
    return impls


def first_conv_train_impls(on_gpu: bool) -> dict:
    """{name: jitted fn(x, kernel, g) → (conv, kernel gradient)} for training's first conv
    (its input gradient unused); XLA's first."""
    grads = functools.partial(with_grads, input_grad=False)

    def triton(*grad_shape):
        return grads(train_conv.with_taps_grad(dirnet_layers.conv_taps, not on_gpu, grad_shape))

    impls = {
        "taps, xla kernel grad": grads(dirnet_layers.conv_taps),
        "xla conv and kernel grad": grads(train_conv.xla_conv),
        "taps, triton kernel grad": triton(),
    }
    for shape in TAPS_GRAD_SHAPES if on_gpu else []:
        impls["taps, triton kernel grad rows={} block={} warps={}".format(*shape)] = triton(*shape)
    return impls


def first_layer_train_impls(on_gpu: bool) -> dict:
    """{name: jitted fn(x, kernel, g) → (pooled, mean, var, and the gradients of kernel,
    scale and bias for the pooled gradient g)} for training's first layer with its
    BatchNorm (batch statistics), ELU and average pooling: layer by layer (as it trains off
    CUDA), against at once (`dirnet_jax.layers.first_layer_train`, first_layer_grad's kernels, as it
    trains on CUDA: three TF32 products, `first_layer_grad.GRAD_SHAPES[3]`)."""
    scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.2, 0.2, 16)
    options = dict(downsampling="avg", conv=dirnet_layers.conv_taps_train, dtype=jnp.float32)

    def grads(layer):
        def fn(x, kernel, g):
            out, vjp = jax.vjp(lambda *p: layer(x, *p), kernel, scale, bias)
            return *out, *vjp((g, jnp.zeros(16), jnp.zeros(16)))

        return jax.jit(fn)

    # The kernel gradient's shapes were timed in run 6 (benchmarks/NOTES.md): the one
    # training runs alone.
    passes = models.TRAIN_FIRST_LAYER_PASSES
    grad_shape = first_layer_grad.GRAD_SHAPES[passes]
    name = "at once as trained, kernel grad rows={} block={} warps={}".format(*grad_shape)
    name += f", {passes} TF32 product{'s' * (passes > 1)}" if passes else ""
    at_once = functools.partial(dirnet_layers.first_layer_train, **options, interpret=not on_gpu,
                                grad_shape=grad_shape, passes=passes)  # fmt: skip
    return {
        "layer by layer": grads(functools.partial(dirnet_layers._first_layer_reference, **options)),
        name: grads(at_once),
    }


def layer_shapes(layer: str, size: int, batch: int) -> list[tuple[int, ...]]:
    """The shapes of the arrays the layer's implementations take: (x, kernel, bias) at
    inference, (x, kernel, output gradient) in training; the input at `size` for the first
    layer (1, train1), at half of it for the second (2, train)."""
    side, cin = (size, 2) if layer in ("1", "train1", "train1bn") else (size // 2, 16)
    last = (batch, side, side, 16) if layer.startswith("train") else (16,)
    if layer == "train1bn":  # the pooled output's gradient
        last = (batch, side // 2, side // 2, 16)
    return [(batch, side, side, cin), (3, 3, cin, 16), last]


def layer_inputs(layer: str, size: int, batch: int) -> list[jax.Array]:
    """Random arrays of `layer_shapes`, float32."""
    rng = np.random.default_rng(0)
    x_shape, kernel_shape, last = layer_shapes(layer, size, batch)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = rng.normal(size=kernel_shape) * 0.5 / kernel_shape[2] ** 0.5
    last = rng.normal(size=last) * (1 if layer.startswith("train") else 0.3)
    return [x, jnp.asarray(kernel, jnp.float32), jnp.asarray(last, jnp.float32)]


IMPLS = {
    "1": first_layer_impls,
    "2": pooled_layer_impls,
    "train": train_conv_impls,
    "train1": first_conv_train_impls,
    "train1bn": first_layer_train_impls,
}


def max_abs_diff(got, reference) -> float:
    """The largest difference over every array of got from reference's (a pytree each)."""
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(reference), strict=True))  # fmt: skip


def main(argv: list[str]) -> None:
    opts = parse(argv)
    out = core.output_path(opts["out"], "layers")
    size, batch, layer = int(opts["size"]), int(opts["batch"]), opts["layer"]
    on_gpu = jax.default_backend() == "gpu"
    core.MIN_SECONDS = float(opts["min_seconds"] or 0.5)
    args = layer_inputs(layer, size, batch)
    x, side = args[0], args[0].shape[1]
    if layer == "train":  # x and g read by the conv and by each gradient; y and dx written
        moved = 6 * x.nbytes
    elif layer == "train1":  # x read by the conv and the kernel gradient, y written, g read
        moved = 2 * x.nbytes + 2 * args[2].nbytes
    elif layer == "train1bn":  # at least: x read 4 times, the pooled y written, its g read twice
        moved = 4 * x.nbytes + 3 * args[2].nbytes
    else:  # the input read once, the pooled output written once
        moved = (x.size + batch * (side // 2) ** 2 * 16) * 4
    impls = IMPLS[layer](on_gpu)
    reference = next(iter(impls.values()))(*args)
    impls["copy"] = jax.jit(lambda x, *_: x * 2)  # reads and writes the input's bytes
    rows = []
    for name, fn in impls.items():
        try:
            first, sec = core.timed(lambda fn=fn: fn(*args), 10)
            diff = max_abs_diff(fn(*args), reference) if name != "copy" else 0.0
            nbytes = 2 * x.nbytes if name == "copy" else moved
        except Exception as err:  # a shape Triton refuses: say so and go on
            print(f"failed: {name}: {type(err).__name__}: {str(err).splitlines()[0]}",
                  file=sys.stderr)  # fmt: skip
            continue
        rows.append(dict(impl=name, median_ms=sec * 1e3, gb_per_s=nbytes / sec / 1e9,
                         first_call_s=first, max_abs_diff=diff))  # fmt: skip
        print(f"{name:44} {sec * 1e3:9.3f} ms {nbytes / sec / 1e9:8.0f} GB/s  "
              f"first {first:6.2f} s  max |Δ| {diff:.2e}", flush=True)  # fmt: skip
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    what = {"1": "first layer", "2": f"second layer ({side}², 16 channels)",
            "train": f"second layer's conv in training ({side}², 16 channels)",
            "train1": f"first conv in training ({side}², 2 → 16 channels)",
            "train1bn": f"first layer in training with BatchNorm, ELU, pooling ({side}²)",
            }[layer]  # fmt: skip
    print(f"{what}, {size}² images, batch {batch}, on {device}; GB/s of {moved / 1e9:.2f} GB")
    atomic_write_text(
        out,
        json.dumps(
            {
                "machine": machine.describe(),
                "layer": layer,
                "size": size,
                "batch": batch,
                "rows": rows,
            },
            indent=2,
        ),
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
