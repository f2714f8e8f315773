"""Independent references the kernel tests compare with."""

import flax.linen as nn
import jax


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
