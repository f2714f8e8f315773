"""One frozen configuration for a DIRNet and its training; the paper's variants as data."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

DOWNSAMPLINGS = ("avg", "max", "strided")
RECEPTIVE_FIELDS = ("patch", "overlap", "global")
TRANSFORMERS = ("cubic", "quadratic", "tps")
BOUNDARIES = ("edge", "zeros")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Fields that may change between runs in one work directory (resuming with more steps, say).
SCHEDULE_FIELDS = frozenset({"num_steps", "log_every", "checkpoint_every"})
# Fields the jitted training and evaluation steps never read (the batch's size comes with
# its shape): a TrainState keeps its config without them (`DIRNetConfig.network`).
RUN_FIELDS = SCHEDULE_FIELDS | {"seed", "batch_size", "max_checkpoints", "num_val_pairs"}


@dataclasses.dataclass(frozen=True)
class DIRNetConfig:
    """Everything that defines a DIRNet, its data shape and its training run.

    Defaults are the paper's cardiac setting (256×256, four downsamplings → 16×16 grid).
    """

    # Data.
    image_shape: tuple[int, ...] = (256, 256)
    channels: int = 1
    # Regressor.
    features: int = 16
    num_downsamplings: int = 4
    # 3×3 conv layers; the first `num_downsamplings` are each followed by a downsampling.
    # None: one per downsampling (the paper's 256×256 net). The paper's MNIST net keeps all
    # four convs of that net and drops the third and fourth downsampling: 4 with 2.
    conv_layers: int | None = None
    downsampling: str = "avg"  # avg | max (A1) | strided (A2)
    receptive_field: str = "patch"  # patch | overlap (C1) | global (C2)
    dense_features: int = 1024  # width of the two dense layers of the global head
    bn_momentum: float = 0.9
    # The regressor's activations; its parameters, the spline, the warp and the loss stay
    # float32. bfloat16 halves the memory traffic of the 256² layers on a GPU, at bfloat16
    # precision (~3 significant digits) of the control-point displacements.
    compute_dtype: str = "float32"  # float32 | bfloat16
    # Spatial transformer and resampler.
    transformer: str = "cubic"  # cubic | quadratic (B1) | tps (B2)
    boundary: str = "edge"  # edge | zeros, see dirnet_jax.resample
    # Training.
    similarity: str | Callable = "ncc"  # a name in losses.SIMILARITIES, or a loss function
    # A smoothness penalty on the displacement field (a name in losses.REGULARIZERS, or a
    # function), added to the similarity times regularizer_weight. 0, the paper's: none.
    regularizer: str | Callable = "bending"
    regularizer_weight: float = 0.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    num_steps: int = 10_000
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1_000
    max_checkpoints: int = 2
    num_val_pairs: int = 64

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        for name, allowed in (
            ("downsampling", DOWNSAMPLINGS),
            ("receptive_field", RECEPTIVE_FIELDS),
            ("transformer", TRANSFORMERS),
            ("boundary", BOUNDARIES),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.num_downsamplings < 1:
            raise ValueError(f"num_downsamplings must be ≥ 1, got {self.num_downsamplings}")
        if self.conv_layers is not None and self.conv_layers < self.num_downsamplings:
            raise ValueError(
                f"conv_layers={self.conv_layers} < num_downsamplings={self.num_downsamplings}: "
                "every downsampling follows a conv"
            )
        factor = self.downsampling_factor
        if any(s % factor for s in self.image_shape):
            raise ValueError(
                f"image_shape {self.image_shape} is not divisible by 2**num_downsamplings = "
                f"{factor}"
            )
        counts = ("features", "channels", "dense_features", "batch_size", "num_steps",
                  "log_every", "checkpoint_every", "max_checkpoints", "num_val_pairs")  # fmt: skip
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        # Every comparison with NaN is false, so these refuse NaN too.
        if not (0 <= self.learning_rate < math.inf):
            raise ValueError(f"learning_rate must be finite and ≥ 0, got {self.learning_rate}")
        if not (0 <= self.regularizer_weight < math.inf):
            raise ValueError(
                f"regularizer_weight must be finite and ≥ 0, got {self.regularizer_weight}"
            )
        if not (0 <= self.bn_momentum <= 1):
            raise ValueError(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")

    @property
    def ndim(self) -> int:
        return len(self.image_shape)

    @property
    def num_conv_layers(self) -> int:
        return self.num_downsamplings if self.conv_layers is None else self.conv_layers

    @property
    def downsampling_factor(self) -> int:
        return 2**self.num_downsamplings

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Control grid for `image_shape`: one control point per patch."""
        return tuple(s // self.downsampling_factor for s in self.image_shape)

    @property
    def grid_spacing(self) -> float:
        return float(self.downsampling_factor)

    def network(self) -> DIRNetConfig:
        """This config with RUN_FIELDS at their defaults: what the jitted steps see, so that
        runs differing only in seed or schedule share one compiled program (a new seed
        recompiled the 28² training step: 6.5 s against 0.3 s on the 2-core CPU)."""
        return dataclasses.replace(self, **{f: DEFAULTS[f] for f in RUN_FIELDS})

    def replace(self, **overrides: Any) -> DIRNetConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a loss or regularizer function is recorded by its qualified
        name."""
        out = dataclasses.asdict(self)
        for name in ("similarity", "regularizer"):
            if callable(fn := getattr(self, name)):
                out[name] = f"{fn.__module__}.{getattr(fn, '__qualname__', repr(fn))}"
        out["image_shape"] = list(self.image_shape)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DIRNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**values)


# The paper's ablations (Section 4.2), as overrides of the baseline.
PAPER_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "A1": {"downsampling": "max"},
    "A2": {"downsampling": "strided"},
    "B1": {"transformer": "quadratic"},
    "B2": {"transformer": "tps"},
    "C1": {"receptive_field": "overlap"},
    "C2": {"receptive_field": "global"},
}


def variant(name: str, base: DIRNetConfig | None = None, **overrides: Any) -> DIRNetConfig:
    """The config of a paper variant on top of `base` (default: the paper's cardiac setup)."""
    if name not in PAPER_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {list(PAPER_VARIANTS)}")
    base = base or DIRNetConfig()
    return base.replace(**PAPER_VARIANTS[name], **overrides)


DEFAULTS = {f.name: f.default for f in dataclasses.fields(DIRNetConfig)}
