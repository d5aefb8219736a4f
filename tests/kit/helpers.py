"""Small model builders shared by the tests."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.kernels.numerics import uint8_high


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


class Block(nn.Module):
    """conv-bn-relu, conv-bn, + shortcut (identity or strided 1x1 conv), relu; functional ops on purpose."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return torch.relu(torch.add(self.bn2(self.conv2(out)), self.short(x)))


class Net(nn.Module):
    """A residual CNN on 8x8 digits: stem, three blocks (one strided with a 1x1 projection), depthwise, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1))
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.blocks(self.stem(x))).relu()
        return self.head(x.mean((2, 3)))


SEVEN_BIT_CPU = uint8_high() < 255  # no VNNI: int8 layers run 7-bit activation codes (kernels/numerics.py)


def int8_atol(full_codes: float) -> float:
    """The relative tolerance between our int8 outputs and another runtime's 8-bit ones (ONNX Runtime,
    compressed-tensors): ``full_codes`` where this CPU multiplies 8-bit codes, 5e-2 where it runs 7-bit ones.

    Example:
        >>> int8_atol(1e-4) in (1e-4, 5e-2)
        True
    """
    return 5e-2 if SEVEN_BIT_CPU else full_codes
