"""Independent references the kernel tests compare with."""

import flax.linen as nn
import jax


def conv_elu_pool(x, kernel, bias, downsampling):
    """pool(elu(conv(x, kernel, SAME) + bias)) for [B, H, W, C]: XLA's convolution at full
    float32 precision, flax's ELU and pooling."""
    conv = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    pool = nn.avg_pool if downsampling == "avg" else nn.max_pool
    return pool(nn.elu(conv + bias), (2, 2), strides=(2, 2))
