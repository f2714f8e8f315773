"""dirnet-jax: DIRNet deformable image registration (de Vos et al., DLMIA 2017) in JAX."""

from dirnet_jax.config import PAPER_VARIANTS, DIRNetConfig, variant
from dirnet_jax.models import Registration, apply, init_variables

# `dirnet_jax.register` is the module of the register command; the jitted function is
# `dirnet_jax.models.register`.

__all__ = [
    "PAPER_VARIANTS",
    "DIRNetConfig",
    "Registration",
    "apply",
    "init_variables",
    "variant",
]
__version__ = "0.1.0"
