"""The same DIRNet in PyTorch, eager: what a VoxelMorph or MONAI user would run.

Same layers as dirnet_jax.models.Regressor (baseline variant), the same B-spline matrices
(dirnet_jax.bspline.bspline_matrix), ``grid_sample`` for the bilinear warp (border padding,
align_corners=True: pixel centres at integer coordinates, as ours) and the same per-pair NCC.
Used by benchmarks.core for the PyTorch ratios; needs ``torch`` (not a dependency of the
package: ``pip install torch==2.13.0``).
"""

from __future__ import annotations

import torch
from torch import nn

from dirnet_jax.bspline import bspline_matrix


class Regressor(nn.Module):
    def __init__(self, features: int = 16, num_downsamplings: int = 4, conv_layers=None):
        super().__init__()

        def block(cin, cout, kernel):
            return [
                nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(cout, momentum=0.1),
                nn.ELU(),
            ]

        layers, channels = [], 2
        for i in range(conv_layers or num_downsamplings):
            layers += block(channels, features, 3)
            if i < num_downsamplings:
                layers.append(nn.AvgPool2d(2))
            channels = features
        layers += block(features, features, 1) + block(features, features, 1)
        layers.append(nn.Conv2d(features, 2, 1))
        nn.init.normal_(layers[-1].weight, std=1e-5)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, fixed, moving):  # [B, 1, H, W] each → [B, 2, gh, gw]
        return self.net(torch.cat([fixed, moving], dim=1))


class DIRNet(nn.Module):
    def __init__(self, size: int, num_downsamplings: int, features: int = 16, conv_layers=None):
        super().__init__()
        self.regressor = Regressor(features, num_downsamplings, conv_layers)
        grid = size // 2**num_downsamplings
        matrix = torch.from_numpy(bspline_matrix(size, grid, 3))
        self.register_buffer("matrix", matrix)  # [size, grid]
        axis = torch.arange(size, dtype=torch.float32)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("identity", torch.stack([rows, cols]))  # [2, H, W]
        self.size = size

    def forward(self, fixed, moving):
        grid = self.regressor(fixed, moving)  # [B, 2, gh, gw], (row, col) in pixels
        field = torch.einsum("hi,wj,bdij->bdhw", self.matrix, self.matrix, grid)
        coords = self.identity + field  # absolute (row, col)
        normalised = 2 * coords / (self.size - 1) - 1
        sample_at = torch.stack([normalised[:, 1], normalised[:, 0]], dim=-1)  # (x, y)
        warped = nn.functional.grid_sample(
            moving, sample_at, mode="bilinear", padding_mode="border", align_corners=True
        )
        return warped, field


def ncc(x, y, eps: float = 1e-8):
    x = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    y = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
    return (x * y).mean(1) / torch.sqrt(((x * x).mean(1) + eps) * ((y * y).mean(1) + eps))
