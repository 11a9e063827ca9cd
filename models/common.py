"""Helpers shared by the zoo definitions: seeded construction, non-trivial BN statistics.

A freshly initialised BatchNorm has running_mean 0, running_var 1, weight 1 and bias 0,
so folding it is an identity and a folding test would prove nothing.  Every zoo model is
therefore built under a fixed seed and its BN parameters and buffers are then replaced by
random but well-conditioned values (variance in [0.5, 2], |weight| in [0.5, 1.5], ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DEFAULT_SEED = 0


def _uniform(shape: torch.Size, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def randomize_bn_stats(module: nn.Module, seed: int = DEFAULT_SEED) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial, deterministic statistics and affine params.

    running_mean ~ U(-0.5, 0.5), running_var ~ U(0.5, 2), weight ~ ±U(0.5, 1.5) with a random
    sign, bias ~ U(-0.5, 0.5).  Returns ``module`` (modified in place).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            if bn.running_mean is None or bn.running_var is None:  # track_running_stats=False
                continue
            shape = bn.running_mean.shape
            bn.running_mean.copy_(_uniform(shape, -0.5, 0.5, gen))
            bn.running_var.copy_(_uniform(shape, 0.5, 2.0, gen))
            if bn.affine:
                sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
                bn.weight.copy_(sign * _uniform(shape, 0.5, 1.5, gen))
                bn.bias.copy_(_uniform(shape, -0.5, 0.5, gen))
    return module


def count_batchnorms(module: nn.Module) -> int:
    """Number of BatchNorm layers (1d/2d/3d) in ``module``: each exports as one BatchNormalization."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def build_seeded(factory: Callable[[], ModuleT], seed: int = DEFAULT_SEED) -> ModuleT:
    """Call ``factory`` under ``seed`` without disturbing the global RNG, randomize BNs, eval()."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    randomize_bn_stats(module, seed)
    return module.eval()
