"""Independent references the kernel tests compare with."""

import flax.linen as nn
import jax

from dirnet_jax import init_variables


def conv_same(x, kernel):
    """conv(x, kernel, SAME, stride 1) for [B, H, W, Cin] and [kh, kw, Cin, Cout]: XLA's
    convolution at full float32 precision."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip


def conv_elu_pool(x, kernel, bias, downsampling):
    """pool(elu(conv(x, kernel, SAME) + bias)) for [B, H, W, C]: `conv_same`, flax's ELU
    and pooling."""
    pool = nn.avg_pool if downsampling == "avg" else nn.max_pool
    return pool(nn.elu(conv_same(x, kernel) + bias), (2, 2), strides=(2, 2))


def registering(config):
    """(variables, pairs) for `register`: a DIRNet's initial variables with a random output
    layer (initially zero: a real grid, not the identity), and 2 random 64² pairs."""
    variables = init_variables(config, jax.random.key(0))
    params = dict(variables["params"])
    shape = params["output"]["kernel"].shape
    params["output"] = {"kernel": jax.random.normal(jax.random.key(1), shape),
                        "bias": params["output"]["bias"]}  # fmt: skip
    pairs = jax.random.uniform(jax.random.key(2), (2, 2, *config.image_shape, 1))
    return {"params": params, "batch_stats": variables["batch_stats"]}, pairs
