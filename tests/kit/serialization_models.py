"""The model every serialization test saves and loads: one of each quantizable kind, and its inputs."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Every quantizable kind in one model: Embedding, Conv2d, Linear (640 and 256 inputs: int4-friendly)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 128)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(640, 256)
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.flatten(1)[:, :8].long().clamp(0, 16)
        h = torch.cat([self.conv(x).relu().flatten(1), self.emb(ids).mean(1)], 1)
        return self.fc2(self.norm(self.fc1(h)).relu())


def skeleton(seed: int) -> Net:
    """A freshly built ``Net`` with random weights everywhere (LayerNorm too, so it must come from the file)."""
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net.eval()


def inputs(batch: int, seed: int = 7) -> torch.Tensor:
    """Digit-like images: integer pixel values 0..16 on an 8x8 grid."""
    return torch.randint(0, 17, (batch, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).float()
