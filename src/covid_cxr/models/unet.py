"""Lung segmentation: a small U-Net decoder on the EfficientNet-Lite0 encoder ("lite0-unet").

Input (N, 1, S, S) in [0, 1] (S divisible by 32), output (N, 1, S, S) lung logits. The encoder
is `EfficientNetLite` at Lite0 size (ImageNet weights through its own loader) without its
1280-channel head conv and classifier, which segmentation does not use; skip features are taken
where the resolution halves: stride 2 (16 ch), 4 (24), 8 (40), 16 (112) and 32 (320). Each
decoder stage upsamples x2, concatenates the skip and applies one 3x3 conv + BN + ReLU; the last
stage works at stride 2 and the logits are upsampled bilinearly to the input size, which keeps
the decoder to about a tenth of the encoder's cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.models import register
from covid_cxr.models.efficientnet_lite import (
    INPUT_SCALE,
    INPUT_SHIFT,
    LITE0,
    EfficientNetLite,
    load_imagenet,
)

# Index of the last block at strides 2, 4, 8, 16 and 32 (B0_STAGES: 1, 2, 2, 3, 3, 4, 1).
SKIP_BLOCKS = (0, 2, 4, 10, 15)
SKIP_CHANNELS = (16, 24, 40, 112, 320)
DECODER_CHANNELS = (64, 48, 24, 16)  # stride 16, 8, 4, 2


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Lite0UNet(nn.Module):
    def __init__(self, dropout: float = 0.1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.encoder = EfficientNetLite(
            LITE0, dropout=0.0, drop_connect=0.0, bn_momentum=bn_momentum
        )
        deeper = SKIP_CHANNELS[-1]
        stages = []
        for skip, out in zip(SKIP_CHANNELS[-2::-1], DECODER_CHANNELS, strict=True):
            stages.append(_conv_bn_relu(deeper + skip, out))
            deeper = out
        self.decoder = nn.ModuleList(stages)
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(deeper, 1, 1)

    def drop_classifier(self) -> None:
        """Remove the encoder's head conv and classifier (after loading ImageNet weights)."""
        for name in ("_conv_head", "_bn1", "_head_act", "_dropout", "_fc"):
            delattr(self.encoder, name)
        self.encoder.cam_layer = None

    def skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        x = x * INPUT_SCALE + INPUT_SHIFT
        x = enc._conv_stem(x, enc._conv_stem.weight.sum(1, keepdim=True))
        x = F.relu6(enc._bn0(x))
        out = []
        for i, block in enumerate(enc._blocks):
            x = block(x)
            if i in SKIP_BLOCKS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        *skips, y = self.skips(x)
        for stage, skip in zip(self.decoder, reversed(skips), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = stage(torch.cat([y, skip], 1))
        y = self.head(self.dropout(y))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


@register("lite0-unet", task="segmentation")
def lite0_unet(
    pretrained: bool = True, dropout: float = 0.1, bn_momentum: float = 0.1, freeze_blocks: int = 0
) -> Lite0UNet:
    """Lung segmenter; `pretrained` loads the encoder's ImageNet weights; `freeze_blocks` keeps
    the stem and that many first encoder blocks at their ImageNet values (no backward pass
    through the high-resolution layers, the bulk of a CPU training step)."""
    model = Lite0UNet(dropout=dropout, bn_momentum=bn_momentum)
    if pretrained:
        load_imagenet(model.encoder)
    model.drop_classifier()
    model.encoder.freeze(freeze_blocks)
    return model
