"""Learnable parts of feature losses: FGD's GcBlock, the non-local block, and a per-level container for them.

These blocks belong to the *loss*, not to either detector: they are trained with the student (the Distiller's
``trainable_state_dict`` keeps them) and thrown away at export. Their shapes depend on the teacher's channel count
of each FPN level, which is known only once teacher and student are built; :class:`LevelModules` therefore creates
them in ``setup_levels`` (to be called before the optimizer is built) and, as a fallback, lazily on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GcBlock", "NonLocalBlock", "LevelModules"]


class GcBlock(nn.Module):
    """Global context block (Cao et al., "GCNet", ICCVW 2019), as used by FGD's global distillation.

    ``y = x + T(sum_j softmax_j(W_k x_j) x_j)``: context modelling (1x1 conv ``C -> 1``, softmax over H*W, weighted
    sum of the features) then transform ``T`` = 1x1 conv ``C -> C/ratio`` -> LayerNorm -> ReLU -> 1x1 conv back,
    broadcast-added to every location. Initialised like FGD's code: Kaiming (fan-in) context conv, zero last conv,
    so a fresh block is the identity.

    Args:
        channels: ``C``.
        ratio: Bottleneck reduction (FGD: 2).
    """

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        n, c = x.shape[:2]
        weights = torch.softmax(self.context(x).reshape(n, 1, -1), dim=2)  # (N, 1, HW)
        context = (x.reshape(n, c, -1) * weights).sum(dim=2).reshape(n, c, 1, 1)
        return x + self.transform(context)


class NonLocalBlock(nn.Module):
    """Embedded dot-product non-local block (Wang et al., CVPR 2018), as in Zhang & Ma's (ICLR 2021) code.

    ``z = x + BN(W_z (1/M) sum_j (theta(x_i) . phi(x_j)) g(x_j))`` with 1x1 convs ``theta, phi, g: C -> C/2``,
    ``phi`` and ``g`` followed by a 2x2 max-pool (``M`` = pooled positions). ``W_z``'s BatchNorm starts at zero, so a
    fresh block is the identity. (Their code uses 64 inner channels and pool 8/4 on the two finest levels.)

    Args:
        channels: ``C``.
        pool: Max-pool size on ``phi``/``g`` (1 disables sub-sampling).
    """

    def __init__(self, channels: int, pool: int = 2) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.pool = nn.MaxPool2d(pool, ceil_mode=True) if pool > 1 else nn.Identity()
        self.out = nn.Sequential(nn.Conv2d(inner, channels, kernel_size=1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        phi = self.pool(self.phi(x)).flatten(2)  # (N, C', M)
        g = self.pool(self.g(x)).flatten(2).transpose(1, 2)  # (N, M, C')
        y = (theta @ phi / phi.shape[-1]) @ g  # (N, HW, C')
        return x + self.out(y.transpose(1, 2).reshape(n, -1, h, w))


class LevelModules(nn.Module):
    """One ``block_cls(channels, **block_kwargs)`` per FPN level, keyed by level name.

    Args:
        block_cls: Module class taking the level's channel count as first argument.
        owner: Name of the owning loss, for messages.
        **block_kwargs: Extra constructor arguments of ``block_cls``.
    """

    def __init__(self, block_cls: type[nn.Module], owner: str, **block_kwargs: Any) -> None:
        super().__init__()
        self.block_cls = block_cls
        self.block_kwargs = block_kwargs
        self.owner = owner
        self.levels = nn.ModuleDict()

    def setup_levels(self, channels: Mapping[str, int]) -> None:
        """Create the blocks of every level in ``channels`` (``{level name: teacher channels}``) not yet built."""
        for name, c in channels.items():
            if name not in self.levels:
                self.levels[name] = self.block_cls(int(c), **self.block_kwargs)

    def get(self, level: str, feat: Tensor) -> nn.Module:
        """The block of ``level``; built on the fly (with a warning) if ``setup_levels`` did not create it."""
        if level not in self.levels:
            warnings.warn(
                f"{self.owner}: building its learnable blocks for level '{level}' on first use. An optimizer built "
                f"before this call does not train them and a checkpoint saved before it lacks them; call "
                f"setup_levels({{level: channels}}) on the loss before building the optimizer.",
                stacklevel=3,
            )
            self.levels[level] = self.block_cls(feat.shape[1], **self.block_kwargs).to(feat.device, feat.dtype)
        return self.levels[level]
