"""read_radiograph on real radiographs of every layout in the shared data, and on bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from covid_cxr.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    RadiographError,
    UnreadableFileError,
    UnsupportedImageError,
)
from covid_cxr.imaging import Radiograph, read_radiograph
from imaging_helpers import encode, make_dicom, png_claiming, truncated

KAGGLE_JPEG = "kaggle-normal-196/NORMAL/NORMAL2-IM-1018-0001.jpeg"  # 640 x 624, L
HANNOVER_PNG = "covid-19-image-repository/png/262a70ca.png"  # 448 x 367, L
IEEE = "covid-chestxray-dataset/images/"

# One real file per (collection, format, mode) found in the shared data.
REAL_FILES = [
    ("chest_xray/test/NORMAL/NORMAL2-IM-1236-0001.jpeg", "JPEG", "RGB"),
    (KAGGLE_JPEG, "JPEG", "MONOCHROME2"),
    (IEEE + "aspiration-pneumonia-5-day0.jpg", "JPEG", "MONOCHROME2"),
    (IEEE + "39EE8E69-5801-48DE-B6E3-BE7D1BCF3092.jpeg", "JPEG", "RGB"),
    (IEEE + "10.1016-slash-j.crad.2020.04.002-b.png", "PNG", "MONOCHROME2"),
    (IEEE + "covid-19-pneumonia-22-day2-pa.png", "PNG", "RGB"),
    (IEEE + "pneumocystis-pneumonia-2-PA.png", "PNG", "RGBA"),  # alpha < 255 on its border
    (IEEE + "tpmd200203f2-c.png", "PNG", "PALETTE"),
    (HANNOVER_PNG, "PNG", "MONOCHROME2"),
    ("nih-chestxray8-subset/Pneumonia/00001250_001.png", "PNG", "MONOCHROME2"),
    ("nih-chestxray8-subset/Pneumonia/00001054_002.png", "PNG", "RGBA"),
]


def luminance(image: Image.Image) -> np.ndarray:
    """Independent reference: ITU-R 601 luma composited on black, in [0, 1]."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255
    return (rgba[..., :3] @ [0.299, 0.587, 0.114]) * rgba[..., 3]


def minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def assert_canonical(result: Radiograph) -> None:
    assert result.pixels.dtype == np.float32
    assert result.pixels.shape == (result.height, result.width)
    assert 0.0 <= result.pixels.min() < result.pixels.max() <= 1.0


def refused(error: type[RadiographError], source: object, label: str, /, **options: object) -> str:
    """Read `source`, expect exactly `error`, and return its message, which must name the file."""
    with pytest.raises(error) as caught:
        read_radiograph(source, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert label in message
    assert type(caught.value) is error
    return message


@pytest.fixture(scope="module")
def kaggle(datasets: Path) -> Image.Image:
    return Image.open(datasets / KAGGLE_JPEG).convert("L")


@pytest.fixture(scope="module")
def hannover(datasets: Path) -> np.ndarray:
    return np.asarray(Image.open(datasets / HANNOVER_PNG).convert("L"))


# --- real files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("relative", "fmt", "photometric"), REAL_FILES)
def test_real_file_decodes_to_luminance(
    datasets: Path, relative: str, fmt: str, photometric: str
) -> None:
    path = datasets / relative
    result = read_radiograph(path)
    with Image.open(path) as image:
        expected = luminance(image)
        assert (result.width, result.height) == image.size
    assert_canonical(result)
    assert (result.format, result.photometric, result.bit_depth) == (fmt, photometric, 8)
    assert result.source == str(path)
    # Pillow's integer luma rounds; anything beyond half a grey level would be a real error.
    np.testing.assert_allclose(result.pixels, expected, atol=0.6 / 255)


def test_real_rgba_border_is_composited_on_black(datasets: Path) -> None:
    path = datasets / IEEE / "pneumocystis-pneumonia-2-PA.png"
    rgba = np.asarray(Image.open(path))
    transparent = rgba[..., 3] < 128
    assert transparent.any()
    pixels = read_radiograph(path).pixels
    assert pixels[transparent].max() < 0.5 * rgba[transparent][:, 0].max() / 255


def test_grayscale_jpeg_is_exact(datasets: Path, kaggle: Image.Image) -> None:
    pixels = read_radiograph(datasets / KAGGLE_JPEG).pixels
    assert np.array_equal(np.rint(pixels * 255).astype(np.uint8), np.asarray(kaggle))


def test_bytes_and_path_give_the_same_image(datasets: Path) -> None:
    path = datasets / HANNOVER_PNG
    from_bytes = read_radiograph(path.read_bytes(), name="upload.png")
    assert from_bytes.source == "upload.png"
    assert np.array_equal(from_bytes.pixels, read_radiograph(path).pixels)
    assert read_radiograph(path.read_bytes()).source == "<bytes>"


# --- synthetic encodings of real radiographs ------------------------------------------------


def test_sixteen_bit_png_keeps_every_level(tmp_path: Path) -> None:
    levels = (30_000 + np.arange(128 * 96)).reshape(128, 96).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(levels).save(path)
    result = read_radiograph(path)
    assert_canonical(result)
    assert (result.format, result.bit_depth, result.photometric) == ("PNG", 16, "MONOCHROME2")
    # Neighbours differ by 1/65535: squashing to 8 bits on the way would merge them.
    assert np.array_equal(np.rint(result.pixels.astype(np.float64) * 65535), levels)
    assert len(np.unique(result.pixels)) == levels.size


def test_cmyk_jpeg_matches_its_grayscale_source(kaggle: Image.Image) -> None:
    data = encode(kaggle.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = read_radiograph(data, name="cmyk.jpg")
    assert result.photometric == "CMYK"
    reference = np.asarray(kaggle) / 255
    assert np.abs(result.pixels - reference).mean() < 0.01


def test_exif_orientation_is_applied(kaggle: Image.Image) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored turned left: display rotated 90 degrees clockwise
    upright = read_radiograph(encode(kaggle, "JPEG", quality=90))
    rotated = read_radiograph(encode(kaggle, "JPEG", quality=90, exif=exif.tobytes()))
    assert (rotated.width, rotated.height) == (upright.height, upright.width) == (624, 640)
    assert np.array_equal(rotated.pixels, np.rot90(upright.pixels, k=-1))


def test_single_page_sixteen_bit_tiff(hannover: np.ndarray) -> None:
    levels = hannover.astype(np.uint16) * 257
    result = read_radiograph(encode(Image.fromarray(levels), "TIFF"), name="scan.tif")
    assert (result.format, result.bit_depth) == ("TIFF", 16)
    np.testing.assert_allclose(result.pixels, hannover / 255, atol=1e-6)


# --- DICOM ----------------------------------------------------------------------------------


def test_dicom_monochrome1_and_2_decode_to_the_same_image(hannover: np.ndarray) -> None:
    stored = hannover.astype(np.uint16) * 16  # a 12-bit detector
    mono2 = read_radiograph(make_dicom(stored, "MONOCHROME2", bits_stored=12))
    mono1 = read_radiograph(make_dicom(4095 - stored, "MONOCHROME1", bits_stored=12))
    for result in (mono1, mono2):
        assert_canonical(result)
        assert (result.format, result.bit_depth) == ("DICOM", 12)
        assert (result.width, result.height) == (448, 367)
    assert (mono1.photometric, mono2.photometric) == ("MONOCHROME1", "MONOCHROME2")
    np.testing.assert_allclose(mono2.pixels, minmax(hannover), atol=1e-6)
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1e-6)


def test_dicom_rescale_then_window(hannover: np.ndarray) -> None:
    stored = hannover.astype(np.uint16) * 16
    modality = 2.0 * stored - 1024  # what the scanner meant, in its own units
    centre, width = float(np.median(modality)), float(np.ptp(modality) // 2)
    data = make_dicom(
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=centre,
        WindowWidth=width,
    )
    # DICOM PS3.3 C.11.2.1.2.1 linear window, written out independently of pydicom.
    expected = np.clip((modality - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert expected.min() == 0 and expected.max() == 1  # both ends clipped: min-max is a no-op
    np.testing.assert_allclose(read_radiograph(data).pixels, expected, atol=1e-5)


def test_dicom_voi_lut_sequence_is_applied(hannover: np.ndarray) -> None:
    stored = hannover.astype(np.uint16) * 16
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    inverting = (4095 - np.arange(4096, dtype="<u2")) * 16
    lut.add_new("LUTData", "OW", inverting.tobytes())
    result = read_radiograph(make_dicom(stored, bits_stored=12, VOILUTSequence=[lut]))
    np.testing.assert_allclose(result.pixels, 1 - minmax(hannover), atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=lambda uid: uid.name)
def test_compressed_dicom_decodes_losslessly(hannover: np.ndarray, syntax: str) -> None:
    stored = hannover.astype(np.uint16) * 16
    data = make_dicom(stored, bits_stored=12, transfer_syntax=syntax)
    assert len(data) < stored.nbytes  # really compressed
    np.testing.assert_allclose(read_radiograph(data).pixels, minmax(hannover), atol=1e-6)


def test_dicom_without_preamble_is_read(hannover: np.ndarray) -> None:
    data = make_dicom(hannover, preamble=False)
    assert data[128:132] != b"DICM"
    result = read_radiograph(data, name="old.dcm")
    assert result.format == "DICOM"
    np.testing.assert_allclose(result.pixels, minmax(hannover), atol=1e-6)


def test_rgb_dicom_becomes_luminance(datasets: Path) -> None:
    with Image.open(datasets / IEEE / "covid-19-pneumonia-22-day2-pa.png") as image:
        rgb = image.convert("RGB")
    result = read_radiograph(make_dicom(np.asarray(rgb), "RGB"))
    assert result.photometric == "RGB"
    np.testing.assert_allclose(result.pixels, minmax(luminance(rgb)), atol=1e-5)


def test_dicom_multi_frame_is_refused(hannover: np.ndarray) -> None:
    volume = np.stack([hannover, hannover, hannover])
    message = refused(UnsupportedImageError, make_dicom(volume), "cine.dcm", name="cine.dcm")
    assert "3 frames" in message


def test_dicom_without_pixel_data_is_refused() -> None:
    message = refused(NotAnImageError, make_dicom(None), "report.dcm", name="report.dcm")
    assert "without pixel data" in message


def test_dicom_header_claiming_too_many_pixels(hannover: np.ndarray) -> None:
    data = make_dicom(hannover, Rows=50_000, Columns=50_000)
    refused(ImageTooLargeError, data, "huge.dcm", name="huge.dcm")


def test_truncated_dicom_is_corrupt(hannover: np.ndarray) -> None:
    refused(CorruptImageError, truncated(make_dicom(hannover)), "cut.dcm", name="cut.dcm")


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [KAGGLE_JPEG, HANNOVER_PNG])
def test_truncated_real_file_is_corrupt(datasets: Path, tmp_path: Path, relative: str) -> None:
    path = tmp_path / Path(relative).name
    path.write_bytes(truncated((datasets / relative).read_bytes()))
    message = refused(CorruptImageError, path, path.name)
    assert "truncated" in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient 12, PA view, see attached report\n" * 20)
    refused(NotAnImageError, path, "notes.png")


def test_png_signature_with_garbage_is_corrupt() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    refused(CorruptImageError, data, "broken.png", name="broken.png")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    refused(EmptyFileError, path, "empty.jpg")
    refused(EmptyFileError, b"", "upload.jpg", name="upload.jpg")
    refused(EmptyFileError, b"", "<bytes>")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    refused(UnreadableFileError, tmp_path / "absent.png", "absent.png")
    refused(UnreadableFileError, tmp_path, str(tmp_path))


@pytest.mark.parametrize("side", [50_000, 8_000])  # beyond and within Pillow's own bomb limit
def test_png_header_claiming_too_many_pixels(side: int) -> None:
    # Decoding first would fail as truncated (or run out of memory), not as too large.
    message = refused(ImageTooLargeError, png_claiming(side, side), "bomb.png", name="bomb.png")
    assert "pixels" in message


def test_pixel_limit_is_configurable(datasets: Path) -> None:
    refused(ImageTooLargeError, datasets / HANNOVER_PNG, "262a70ca.png", max_pixels=100_000)


@pytest.mark.parametrize("size", [(32, 32), (1000, 40)])
def test_too_small(kaggle: Image.Image, size: tuple[int, int]) -> None:
    data = encode(kaggle.resize(size), "PNG")
    message = refused(ImageTooSmallError, data, "thumb.png", name="thumb.png")
    assert "64 px" in message


def test_gif_is_refused(kaggle: Image.Image) -> None:
    message = refused(UnsupportedImageError, encode(kaggle, "GIF"), "anim.gif", name="anim.gif")
    assert "GIF" in message


def test_multi_page_tiff_is_refused(kaggle: Image.Image) -> None:
    data = encode(kaggle, "TIFF", save_all=True, append_images=[kaggle])
    message = refused(UnsupportedImageError, data, "pages.tif", name="pages.tif")
    assert "2 frames" in message


def test_floating_point_tiff_is_refused(kaggle: Image.Image) -> None:
    data = encode(kaggle.convert("F"), "TIFF")
    refused(UnsupportedImageError, data, "float.tif", name="float.tif")
