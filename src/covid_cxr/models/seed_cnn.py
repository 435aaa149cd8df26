"""The original project's Keras CNN, reproduced layer for layer (5,668,097 parameters).

Keras original (224x224x3 input, 'valid' padding everywhere):
    Conv2D(32,3) relu, Conv2D(64,3) relu, MaxPool(2), Dropout(.25),
    Conv2D(64,3) relu, MaxPool(2), Dropout(.25), Conv2D(128,3) relu, MaxPool(2), Dropout(.25),
    Flatten, Dense(64) relu, Dropout(.5), Dense(1) sigmoid.

Differences that do not change what the network computes:
- The sigmoid lives in the loss (BCE with logits) and at inference; `forward` returns logits.
- Grayscale input: the original replicated the grey image into 3 channels. Convolving three
  identical channels with kernels W[:, 0..2] equals convolving one channel with their sum,
  and the gradient reaching each W[:, c] is the same either way, so the first layer keeps its
  Keras shape (32, 3, 3, 3) (and the parameter count) but convolves the summed kernel:
  identical results at a third of that layer's cost.
- Flatten uses Keras' NHWC order (channels last), so the Dense(64) weights line up with a
  Keras export; with channels_last tensors that order is also a free view instead of a copy.
- Keras initialisation (Glorot-uniform kernels, zero biases) for a faithful from-scratch run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.models import register

CL = torch.channels_last


class ConvReLU(nn.Conv2d):
    """A Keras Conv2D(activation="relu"): the Grad-CAM layer's output is the rectified map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class FastDropout(nn.Dropout):
    """Dropout whose mask comes from 8 random bytes per 64-bit draw.

    `F.dropout` draws one Bernoulli float per element, which on a CPU cost as much as the
    convolution it follows (25 M elements per batch after the first pooling). Comparing random
    bytes with round(256 p) is 8x fewer generator calls; p is rounded to a multiple of 1/256
    (exact for the seed model's 0.25 and 0.5; at most 255/256). The mask is built in the
    tensor's own memory order, so channels_last stays channels_last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device)
        noise = draws.random_(-(2**63), 2**63 - 1).view(torch.uint8)[:n]
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CL):
            b, c, h, w = x.shape
            noise = noise.view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            noise = noise.view(x.shape)
        cut = min(round(256 * self.p), 255)
        keep = (noise >= cut).to(x.dtype).mul_(256 / (256 - cut))
        return x * keep


class SeedCNN(nn.Module):
    def __init__(self, size: int = 224, dropout: float = 0.25, dense_dropout: float = 0.5) -> None:
        super().__init__()
        side = ((((size - 4) // 2) - 2) // 2 - 2) // 2
        if side < 1:
            raise ValueError(f"seed-cnn needs an input of at least 22 pixels, got {size}")
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.conv4 = ConvReLU(64, 128, 3)
        self.pool = nn.MaxPool2d(2)
        self.drop = FastDropout(dropout)
        self.fc1 = nn.Linear(side * side * 128, 64)
        self.fc_drop = FastDropout(dense_dropout)
        self.fc2 = nn.Linear(64, 1)
        self.cam_layer = self.conv4
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = F.conv2d(x, self.conv1.weight.sum(1, keepdim=True), self.conv1.bias)
        else:
            x = self.conv1(x)
        x = F.relu(x)
        # max-pool and ReLU commute (ReLU is monotonic), so pooling first gives the same values
        # and gradients with a quarter of the ReLU work on the two largest feature maps.
        x = self.drop(F.relu(self.pool(self.conv2(x))))
        x = self.drop(F.relu(self.pool(self.conv3(x))))
        x = self.drop(self.pool(self.conv4(x)))
        x = x.permute(0, 2, 3, 1).flatten(1)
        x = self.fc_drop(F.relu(self.fc1(x)))
        return self.fc2(x).squeeze(1)


@register("seed-cnn")
def seed_cnn(
    pretrained: bool = False, size: int = 224, dropout: float = 0.25, dense_dropout: float = 0.5
) -> SeedCNN:
    """The original trains from scratch; there are no pretrained weights to load."""
    if pretrained:
        raise ModelError("seed-cnn has no pretrained weights; use pretrained = false")
    return SeedCNN(size=size, dropout=dropout, dense_dropout=dense_dropout)
