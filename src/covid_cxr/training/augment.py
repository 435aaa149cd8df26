"""Random augmentation of whole batches in memory: one affine resampling plus intensity jitter.

Every geometric change (zoom, shear, rotation, shift, random crop, horizontal flip) is folded
into one affine matrix per image, and the batch is resampled once with `grid_sample`, so
augmenting costs a few milliseconds per batch instead of a Python loop per image.

After the geometry come the intensity changes, images only, in the order a radiograph is made:
blur (detector sharpness), exposure jitter, noise, then what is burnt into the stored pixels
(black or white borders, markers and text). Every per-image parameter is drawn on the CPU from
the generator, a fixed count per enabled change, so a seed gives the same batch every time;
only the per-pixel noise is drawn on the batch's device (seeded from the generator), so CPU
and CUDA batches differ in their noise.

Matrices map output coordinates to input coordinates (as Keras' ImageDataGenerator and
`affine_grid` both do), in normalised coordinates where the image spans [-1, 1]; for square
images that is the pixel geometry about the centre.
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F

from covid_cxr.config import AugmentConfig


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _chosen(n: int, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """(n,) bool: which images get a change applied with `probability`."""
    return torch.rand(n, generator=generator) < probability


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n,) values as an (n, 1, 1, 1) float tensor on `like`'s device, to broadcast over images."""
    return values.to(like.device, torch.float32).view(-1, 1, 1, 1)


def _matrices(n: int, a: list[list[torch.Tensor | float]]) -> torch.Tensor:
    """Stack a 3x3 matrix given as nested lists of per-image tensors or constants into (n, 3, 3)."""
    rows = [
        torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in r], -1) for r in a
    ]
    return torch.stack(rows, -2)


def random_affine(
    n: int, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, 2, 3) output-to-input matrices for `affine_grid`, drawn per image."""
    zero, one = 0.0, 1.0
    # Keras: independent zoom factors for the two axes, in [1 - zoom, 1 + zoom].
    zx = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    zy = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator)
    zoom = _matrices(n, [[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    # Keras' shear (degrees in Keras 2.x): x_in = cos(s) x, y_in = y - sin(s) x.
    s = torch.deg2rad(_uniform(n, -config.shear, config.shear, generator))
    shear = _matrices(n, [[s.cos(), zero, zero], [-s.sin(), one, zero], [zero, zero, one]])
    t = torch.deg2rad(_uniform(n, -config.rotation, config.rotation, generator))
    rotate = _matrices(n, [[t.cos(), -t.sin(), zero], [t.sin(), t.cos(), zero], [zero, zero, one]])
    tx = 2 * _uniform(n, -config.translate, config.translate, generator)
    ty = 2 * _uniform(n, -config.translate, config.translate, generator)
    shift = _matrices(n, [[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    # Random resized crop: a square window covering an area fraction in [crop_scale, 1],
    # placed uniformly inside the image, stretched to the full output.
    side = _uniform(n, config.crop_scale, 1.0, generator).sqrt()
    cx = (1 - side) * _uniform(n, -1.0, 1.0, generator)
    cy = (1 - side) * _uniform(n, -1.0, 1.0, generator)
    crop = _matrices(n, [[side, zero, cx], [zero, side, cy], [zero, zero, one]])
    flip = torch.ones(n, dtype=torch.float64)
    if config.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    mirror = _matrices(n, [[flip, zero, zero], [zero, one, zero], [zero, zero, one]])
    # Keras order: rotation, shift, shear, zoom; then the crop window and the mirror image.
    matrix = crop @ rotate @ shift @ shear @ zoom @ mirror
    return matrix[:, :2, :].float()


def _geometric(config: AugmentConfig) -> bool:
    return (
        bool(config.zoom or config.shear or config.rotation or config.translate)
        or config.crop_scale < 1.0
    )


@overload
def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
    masks: None = None,
) -> torch.Tensor: ...


@overload
def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None,
    masks: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def augment_batch(
    images: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Augment a float (N, C, H, W) batch in [0, 1]; returns a new float32 batch in [0, 1].

    With `masks` (N, K, H, W), 0/1 (e.g. lung masks for segmentation), returns (images, masks):
    each mask gets exactly its image's geometric transform (resampled bilinearly, then
    re-binarised at 0.5) and no intensity change. The random draws are the same with or
    without masks, so the images come out the same either way.
    """
    x = images.float()
    m = None if masks is None else masks.float()
    n = x.shape[0]
    if _geometric(config):
        theta = random_affine(n, config, generator)
        x = _resample(x, theta, config.fill)
        m = None if m is None else _resample(m, theta, config.fill).ge_(0.5).float()
    elif config.hflip:
        flip = _per_image(_chosen(n, 0.5, generator), x).bool()
        x = torch.where(flip, x.flip(-1), x)
        m = None if m is None else torch.where(flip, m.flip(-1), m)
    x = _blur(x, config, generator)
    x = _jitter(x, config, generator)
    x = _noise(x, config, generator)
    x = _borders(x, config, generator)
    x = _overlays(x, config, generator).clamp_(0.0, 1.0)
    return x if m is None else (x, m)


def _resample(x: torch.Tensor, theta: torch.Tensor, fill: str) -> torch.Tensor:
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def _jitter(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Contrast, brightness and gamma, drawn per image (intensity only: never for masks)."""
    n = x.shape[0]
    if config.contrast:
        c = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * _per_image(c, x) + mean
    if config.brightness:
        b = _uniform(n, -config.brightness, config.brightness, generator)
        x = x + _per_image(b, x)
    if config.gamma:
        g = _uniform(n, -config.gamma, config.gamma, generator).exp()
        x = x.clamp(0, 1) ** _per_image(g, x)
    return x


def _blur(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Gaussian blur of a random sigma on the chosen images: sources differ in sharpness
    (detector, film digitisation, resizing, noise filters)."""
    if not config.blur:
        return x
    n, c, h, w = x.shape
    chosen = _chosen(n, config.blur, generator)
    # 1 - U[0, 1) is in (0, 1]: sigma is never 0, so the kernel never divides by zero.
    sigma = config.blur_sigma * (1 - torch.rand(n, generator=generator, dtype=torch.float64))
    radius = math.ceil(3 * config.blur_sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    # Weights under 1e-7 cannot change a float32 in [0, 1]; as float32 denormals they would
    # slow the convolution several times on CPUs.
    kernel = kernel.where(kernel >= 1e-7, 0.0)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, torch.float32)
    kernel = kernel.repeat_interleave(c, 0)
    # Separable, one depthwise convolution per axis with each image's own kernel as a group.
    flat = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return torch.where(_per_image(chosen, x).bool(), flat.view(n, c, h, w), x)


def _noise(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Gaussian noise of std uniform in [0, noise] per image, clipped to [0, 1]: dose, detector
    and processing leave each source its own noise level."""
    if not config.noise:
        return x
    std = _uniform(x.shape[0], 0.0, config.noise, generator)
    noise = torch.randn(x.shape, generator=_on_device(generator, x.device), device=x.device)
    return (x + noise * _per_image(std, x)).clamp_(0.0, 1.0)


def _on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded from `generator`: the per-pixel noise is drawn where the
    batch is (no copy of a whole batch of noise) and still follows the run's seed."""
    if generator is None:
        return None
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _borders(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """A black or white band on one or more sides of the chosen images: sources pad, frame and
    collimate differently."""
    if not config.borders:
        return x
    n, _, h, w = x.shape
    chosen = _chosen(n, config.borders, generator)
    sides = torch.rand(n, 4, generator=generator) < 0.5  # top, bottom, left, right
    fallback = F.one_hot(torch.randint(4, (n,), generator=generator), 4).bool()
    sides |= fallback & ~sides.any(1, keepdim=True)  # at least one side
    depth = torch.rand(n, 4, generator=generator, dtype=torch.float64) * config.border_max
    white = _chosen(n, 0.5, generator)
    pixels = (depth * torch.tensor([h, h, w, w])).floor() * (sides & chosen[:, None])
    top, bottom, left, right = (v.to(x.device).view(n, 1, 1) for v in pixels.unbind(1))
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    band = (rows < top) | (rows >= h - bottom) | (cols < left) | (cols >= w - right)
    return torch.where(band[:, None], _per_image(white, x), x)


_MAX_MARKS = 3
_MARK_SIZE = (0.02, 0.08)  # a mark's sides, as fractions of the image's


def _overlays(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """1 to 3 flat marks on the chosen images, like the L/R markers and burnt-in text that
    differ from one hospital to the next. Each mark is a small patch gathered, painted and
    scattered back, so the cost does not grow with the image."""
    if not config.overlays:
        return x
    n, c, h, w = x.shape
    count = torch.randint(1, _MAX_MARKS + 1, (n,), generator=generator)
    count = count * _chosen(n, config.overlays, generator)
    flat = x.reshape(n, c, h * w).clone()
    for k in range(_MAX_MARKS):  # every mark is drawn, used or not: a fixed count of draws
        index, mark, value = _mark(n, h, w, generator, x.device)
        mark = (mark & (count > k).to(x.device).view(n, 1))[:, None]
        index = index[:, None].expand(n, c, -1)
        painted = torch.where(
            mark, value.to(x.device, torch.float32).view(n, 1, 1), flat.gather(2, index)
        )
        flat.scatter_(2, index, painted)
    return flat.view(n, c, h, w)


def _mark(
    n: int, h: int, w: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mark per image as a patch of the largest mark's size: (n, P) flat pixel indices
    (distinct, inside the image), (n, P) bool shape and (n,) grey value. The shape is a filled
    block, a row of letter-sized blocks or a frame, mostly bright, mostly near the edges."""
    low, high = _MARK_SIZE
    kind = torch.randint(3, (n,), generator=generator)  # 0 block, 1 text, 2 frame
    height = (_uniform(n, low, high, generator) * h).ceil().long()
    width = (_uniform(n, low, high, generator) * w).ceil().long()
    height = torch.where(kind == 1, height.minimum((width + 2) // 3), height)  # a line of text
    top = (_near_edges(n, generator) * (h - height)).long()
    left = (_near_edges(n, generator) * (w - width)).long()
    bright = _chosen(n, 0.75, generator)
    value = torch.where(
        bright, _uniform(n, 0.85, 1.0, generator), _uniform(n, 0.0, 0.15, generator)
    )
    height, width, top, left, kind = (
        v.to(device).view(n, 1) for v in (height, width, top, left, kind)
    )
    # The patch starts at the mark, or further up/left where the mark nears the far edge.
    p, q = math.ceil(high * h), math.ceil(high * w)
    rows = top.clamp(max=h - p) + torch.arange(p, device=device)
    cols = left.clamp(max=w - q) + torch.arange(q, device=device)
    r, c = rows - top, cols - left
    stroke = (torch.minimum(height, width) / 4).round().clamp(min=1)
    pitch = (0.75 * height).round().clamp(min=2)  # letters about 3/4 as wide as tall
    letters = c.remainder(pitch) < pitch - (pitch / 3).ceil()
    # (rows x columns) minus (inner rows x inner columns): a frame when the inside is cut out.
    outer_r = (r >= 0) & (r < height)
    outer_c = (c >= 0) & (c < width) & ((kind != 1) | letters)
    inner_r = (r >= stroke) & (r < height - stroke) & (kind == 2)
    inner_c = (c >= stroke) & (c < width - stroke)
    shape = (outer_r[:, :, None] & outer_c[:, None, :]) & ~(
        inner_r[:, :, None] & inner_c[:, None, :]
    )
    index = rows[:, :, None] * w + cols[:, None, :]
    return index.flatten(1), shape.flatten(1), value


def _near_edges(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """(n,) positions in [0, 1], three in four within 15% of either end: markers and text sit
    near the edges and corners of a radiograph."""
    near = _chosen(n, 0.75, generator)
    high = _chosen(n, 0.5, generator)
    edge = 0.15 * torch.rand(n, generator=generator, dtype=torch.float64)
    anywhere = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.where(near, torch.where(high, 1 - edge, edge), anywhere)


def describe(config: AugmentConfig) -> str:
    """One line for logs, e.g. 'hflip, zoom 0.2, shear 0.2 deg'."""
    parts = ["hflip"] if config.hflip else []
    for key, unit in (("zoom", ""), ("shear", " deg"), ("rotation", " deg"), ("translate", "")):
        if getattr(config, key):
            parts.append(f"{key} {getattr(config, key):g}{unit}")
    if config.crop_scale < 1:
        parts.append(f"crop area >= {config.crop_scale:g}")
    for key in ("brightness", "contrast", "gamma"):
        if getattr(config, key):
            parts.append(f"{key} {getattr(config, key):g}")
    if config.blur:
        parts.append(f"blur p {config.blur:g} (sigma <= {config.blur_sigma:g} px)")
    if config.noise:
        parts.append(f"noise std <= {config.noise:g}")
    if config.borders:
        parts.append(f"borders p {config.borders:g} (<= {config.border_max:g})")
    if config.overlays:
        parts.append(f"overlays p {config.overlays:g}")
    return ", ".join(parts) or "none"
