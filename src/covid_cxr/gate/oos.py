"""The input gate's out-of-scope pictures: everything a user might upload that is not a frontal
chest radiograph, made here or found inside installed packages, never committed.

`build_oos(out, radiographs)` writes PNG/JPEG files under `out/<split>/<kind>/` and an
`index.csv` (path, kind, split, origin). Every picture is reproducible from the seed. Kinds:

- document, plot: text pages and charts rendered with Pillow / matplotlib (its fonts);
- texture, shapes, noise, gradient: synthetic pictures;
- rotated, inverted, crop: radiographs turned 90/180/270 degrees, inverted, or cut down to a
  patch that shows no chest (the split follows the radiograph's own split, so held-out
  radiographs give held-out out-of-scope pictures);
- lateral: the ieee8023 lateral views (metadata `view` = L), split by patient;
- picture: photographs, logos, icons and figures shipped with matplotlib, scikit-learn, scipy,
  networkx, sympy, swagger-ui and playwright, cropped and recoloured, split by picture;
- medical: CT, MR, ultrasound, nuclear-medicine and other non-radiograph images from pydicom's
  test files, matplotlib's MR slice and nibabel's test volumes, split by file.

scikit-image and imageio pictures are never used: they are reserved for an independent check.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from covid_cxr.fileio import atomic_open

SPLITS = ("train", "test")
_TEXT = (
    "patient report result normal finding chest lung heart date name signed clinic radiology "
    "the of and to in is was with for on at by from invoice total amount page figure table "
    "analysis method data sample value mean error model training study cohort hospital "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
)
WORDS = tuple(_TEXT.split(" "))


@dataclass(frozen=True)
class OosItem:
    """One out-of-scope picture: what it is, which split it belongs to, where it came from."""

    kind: str
    split: str
    origin: str
    image: Image.Image


def stable_split(key: str, test_fraction: float = 0.3) -> str:
    """train/test from a hash of the key, so the same picture or patient always lands alike."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "test" if digest / 0xFFFFFFFF < test_fraction else "train"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _fonts() -> list[Path]:
    root = _package_dir("matplotlib")
    assert root is not None, "matplotlib is a dependency"
    folder = root / "mpl-data" / "fonts" / "ttf"
    return sorted(p for p in folder.glob("*.ttf") if p.stem.startswith(("DejaVu", "STIXGeneral")))


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(low, high, 3))
    return r, g, b


def document(rng: np.random.Generator) -> Image.Image:
    """A page of text: letter, form, slide or screenshot, light or dark."""
    width, height = int(rng.integers(500, 1000)), int(rng.integers(500, 1300))
    dark = rng.random() < 0.25
    paper = _colour(rng, 0, 60) if dark else _colour(rng, 215, 256)
    ink = _colour(rng, 190, 256) if dark else _colour(rng, 0, 90)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    fonts = _fonts()
    y = int(rng.integers(10, 80))
    while y < height - 20:
        size = int(rng.choice([12, 14, 16, 18, 22, 30, 44]))
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
        x = int(rng.integers(10, 80))
        words = " ".join(rng.choice(WORDS, int(rng.integers(2, 14))))
        draw.text((x, y), words.capitalize(), fill=ink, font=font)
        if rng.random() < 0.15:
            draw.line((x, y + size + 4, width - x, y + size + 4), fill=ink, width=1)
        if rng.random() < 0.08:
            box = (x, y + size + 8, width - x, y + size + int(rng.integers(40, 200)))
            draw.rectangle(box, outline=ink, width=2)
            y = box[3]
        y += int(size * rng.uniform(1.3, 2.2))
    return image


def plot(rng: np.random.Generator) -> Image.Image:
    """A chart as a figure in a paper or a screenshot would show it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(rng.uniform(3, 7), rng.uniform(3, 6)), dpi=80)
    x = np.linspace(0, 10, 200)
    style = int(rng.integers(4))
    if style == 0:
        for _ in range(int(rng.integers(1, 4))):
            ax.plot(x, np.sin(x * rng.uniform(0.3, 3)) + rng.normal(0, 0.1, x.size))
    elif style == 1:
        ax.bar(range(8), rng.uniform(0, 10, 8), color=np.array(_colour(rng)) / 255)
    elif style == 2:
        ax.scatter(rng.normal(size=150), rng.normal(size=150), s=8)
    else:
        ax.imshow(rng.normal(size=(12, 12)).cumsum(0), cmap=str(rng.choice(["viridis", "gray"])))
    ax.set_title(" ".join(rng.choice(WORDS, 3)))
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    return image


def _side(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(128, 700)), int(rng.integers(128, 700))


def texture(rng: np.random.Generator) -> Image.Image:
    """Smoothed noise at a random scale, stripes or checks, grey or coloured."""
    w, h = _side(rng)
    kind = int(rng.integers(3))
    if kind == 0:
        field = rng.normal(size=(h, w, 3 if rng.random() < 0.5 else 1))
        image = Image.fromarray(np.uint8(np.clip(field * 40 + 128, 0, 255)).squeeze())
        return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 12))))
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 80)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    if kind == 1:
        values = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    else:
        values = ((xx // period).astype(int) + (yy // period).astype(int)) % 2 * 1.0
    tint = np.array(_colour(rng, 60)) / 255
    return Image.fromarray(np.uint8(values[..., None] * tint * 255))


def shapes(rng: np.random.Generator) -> Image.Image:
    """Ellipses, rectangles and polygons on a plain background (clip art, diagrams)."""
    w, h = _side(rng)
    image = Image.new("RGB", (w, h), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 25))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(5, w)), y0 + int(rng.integers(5, h))
        fill = _colour(rng) if rng.random() < 0.8 else None
        choice = int(rng.integers(3))
        if choice == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=_colour(rng), width=2)
        elif choice == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=_colour(rng), width=2)
        else:
            points = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(5)]
            draw.polygon(points, fill=fill or _colour(rng))
    return image


def noise(rng: np.random.Generator) -> Image.Image:
    """Uniform, Gaussian or salt-and-pepper noise, grey or colour."""
    w, h = _side(rng)
    channels = 3 if rng.random() < 0.5 else 1
    kind = int(rng.integers(3))
    if kind == 0:
        values = rng.random((h, w, channels))
    elif kind == 1:
        values = np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (h, w, channels)), 0, 1)
    else:
        values = (rng.random((h, w, channels)) < rng.uniform(0.05, 0.5)) * 1.0
    return Image.fromarray(np.uint8(values * 255).squeeze())


def gradient(rng: np.random.Generator) -> Image.Image:
    """Linear or radial ramps between two colours, sometimes with a vignette."""
    w, h = _side(rng)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        t = np.hypot(xx - rng.random(), yy - rng.random())
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray(np.uint8(a + (b - a) * t[..., None]))


SYNTHETIC: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "document": document,
    "plot": plot,
    "texture": texture,
    "shapes": shapes,
    "noise": noise,
    "gradient": gradient,
}


def gray(pixels: np.ndarray) -> Image.Image:
    """A [0, 1] float array as an 8-bit grayscale picture."""
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255 + 0.5))


def radiograph_variants(
    pixels: np.ndarray, rng: np.random.Generator
) -> Iterator[tuple[str, str, Image.Image]]:
    """(kind, how, picture): one rotation, the inverse, and a patch that shows no whole chest."""
    turns = int(rng.integers(1, 4))
    yield "rotated", f"rot{90 * turns}", gray(np.rot90(pixels, turns))
    yield "inverted", "inverted", gray(1.0 - pixels)
    h, w = pixels.shape
    side = int(min(h, w) * rng.uniform(0.12, 0.3))
    top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    patch = gray(pixels[top : top + side, left : left + side])
    yield "crop", f"patch{side}", patch.resize((256, 256), Image.Resampling.BILINEAR)


def _to_unit(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32)
    lo, hi = np.percentile(values, (1, 99))
    return np.clip((values - lo) / max(float(hi - lo), 1e-6), 0, 1)


def _dicom_slices(path: Path) -> Iterator[np.ndarray]:
    import pydicom

    ds = pydicom.dcmread(path)
    values = ds.pixel_array  # colour comes back as RGB
    if values.ndim == 4 or (values.ndim == 3 and values.shape[-1] != 3):
        yield from (values[i] for i in range(0, len(values), max(1, len(values) // 6)))
    else:
        yield values


def _volume_slices(volume: np.ndarray) -> Iterator[np.ndarray]:
    volume = np.squeeze(volume)
    if volume.ndim == 4:
        volume = volume[..., 0]
    for axis in range(3):
        for fraction in (0.35, 0.5, 0.65):
            yield np.rot90(np.take(volume, int(volume.shape[axis] * fraction), axis=axis))


def medical_sources() -> Iterator[tuple[str, np.ndarray]]:
    """(origin, pixels) for every non-radiograph medical image found in installed packages."""
    pydicom_dir = _package_dir("pydicom")
    keep = (
        "693_J2KI", "CT_small", "J2K_pixelrep_mismatch", "JPEG2000", "MR_small", "image_dfl",
        "examples_overlay", "examples_jpeg2k", "examples_palette", "examples_rgb_color",
        "examples_ybr_color", "liver_1frame",
    )  # fmt: skip
    if pydicom_dir is not None:
        for stem in keep:
            path = pydicom_dir / "data" / "test_files" / f"{stem}.dcm"
            if path.is_file():
                for i, values in enumerate(_dicom_slices(path)):
                    yield f"pydicom/{stem}#{i}", values
    mpl = _package_dir("matplotlib")
    if mpl is not None:
        raw = gzip.decompress((mpl / "mpl-data" / "sample_data" / "s1045.ima.gz").read_bytes())
        yield "matplotlib/s1045.ima", np.frombuffer(raw, ">u2").reshape(256, 256)
    nib_dir = _package_dir("nibabel")
    if nib_dir is not None:
        import nibabel

        for name in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"):
            path = nib_dir / "tests" / "data" / name
            if path.is_file():
                volume = np.asarray(nibabel.load(path).dataobj)
                for i, values in enumerate(_volume_slices(volume)):
                    yield f"nibabel/{name}#{i}", values


def package_pictures() -> Iterator[tuple[str, Image.Image]]:
    """Photographs, logos, icons and figures shipped inside installed packages."""
    places = {
        "matplotlib": ("mpl-data/sample_data/*.png", "mpl-data/sample_data/*.jpg",
                       "mpl-data/images/*_large.png"),
        "sklearn": ("datasets/images/*.jpg",),
        "scipy": ("ndimage/tests/*.png",),
        "networkx": ("drawing/tests/baseline/*.png",),
        "sympy": ("plotting/tests/*.png",),
        "swagger_ui_bundle": ("vendor/*/favicon-32x32.png",),
        "playwright": ("driver/package/lib/server/chromium/appIcon.png",),
    }  # fmt: skip
    for package, patterns in places.items():
        root = _package_dir(package)
        if root is None:
            continue
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                with Image.open(path) as image:
                    yield f"{package}/{path.relative_to(root)}", image.convert("RGB")


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop, flip, colour change and size, so a few pictures give many views."""
    w, h = image.size
    scale = rng.uniform(0.5, 1.0)
    cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        image = image.convert("L").convert("RGB")
    factor = rng.uniform(0.6, 1.4)
    image = image.point(lambda v: min(255, int(v * factor)))
    side = int(rng.integers(160, 640))
    ratio = image.width / max(1, image.height)
    return image.resize((side, max(64, int(side / ratio))), Image.Resampling.BILINEAR)


def found_items(rng: np.random.Generator, views: int) -> Iterator[OosItem]:
    """Package pictures and medical images, `views` augmented views of each."""
    for origin, image in package_pictures():
        split = stable_split(origin)
        for _ in range(views):
            yield OosItem("picture", split, origin, augment(image, rng))
    for origin, values in medical_sources():
        base = gray(_to_unit(values)) if values.ndim == 2 else Image.fromarray(np.uint8(values))
        split = stable_split(origin.split("#")[0])
        for _ in range(max(1, views // 3)):
            yield OosItem("medical", split, origin, augment(base.convert("RGB"), rng))


@dataclass(frozen=True)
class RadiographRef:
    """An in-scope radiograph the radiograph-derived kinds start from."""

    path: Path
    split: str  # train or test
    origin: str


def build_oos(
    out: Path,
    radiographs: list[RadiographRef],
    laterals: list[RadiographRef],
    *,
    per_kind: int = 200,
    views: int = 12,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Write every out-of-scope picture under `out` and its index.csv; returns the index rows."""
    from covid_cxr.imaging import read_radiograph

    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []

    def save(item: OosItem, fmt: str = "png") -> None:
        folder = out / item.split / item.kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{len(rows):05d}.{fmt}"
        image = item.image if fmt == "png" else item.image.convert("RGB")
        image.save(path, quality=90) if fmt == "jpg" else image.save(path)
        rows.append({"path": str(path), "kind": item.kind, "split": item.split,
                     "origin": item.origin})  # fmt: skip

    for kind, make in SYNTHETIC.items():
        for i in range(per_kind):
            split = "test" if i % 4 == 0 else "train"
            save(OosItem(kind, split, f"{kind}#{i}", make(rng)), "jpg" if i % 2 else "png")
    for ref in radiographs:
        pixels = read_radiograph(ref.path).pixels
        for kind, how, image in radiograph_variants(pixels, rng):
            save(OosItem(kind, ref.split, f"{ref.origin} {how}", image))
    for ref in laterals:
        save(OosItem("lateral", ref.split, ref.origin, gray(read_radiograph(ref.path).pixels)))
    for item in found_items(rng, views):
        save(item, "jpg" if item.kind == "picture" else "png")
    with atomic_open(out / "index.csv", newline="") as stream:
        writer = csv.DictWriter(stream, ("path", "kind", "split", "origin"))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def read_index(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))
