"""What one request asks of the model: read the bytes, predict, and draw what the page shows.

Runs in the inference pool's threads, never on the event loop. Uploads are bytes in memory
from end to end; nothing here writes a file or logs image content or DICOM fields.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.errors import EmptyFileError, NotAnImageError
from covid_cxr.imaging.preprocess import Box, grey_to_uint8, scale_box
from covid_cxr.paths import SHIPPED
from covid_cxr.service import schemas
from covid_cxr.service.security import FORMATS
from covid_cxr.service.settings import ServiceSettings
from covid_cxr.service.uploads import UploadedFile, too_large

if TYPE_CHECKING:
    from covid_cxr.imaging import Radiograph
    from covid_cxr.inference.predictor import Prediction, Predictor

CAM_ALPHA = 0.4
LARGE_PIXELS = 2048 * 2048  # above this, predictions take turns (see Engine.__init__)
# Where the model was trained from is the operator's business, not the API client's.
PRIVATE_METADATA = {"manifest"}
MODEL_CARD = (
    "the shipped model's card, covid_cxr/shipped/README.md in the package: test-set and "
    "external results with 95% confidence intervals"
)
INTENDED_USE = (
    "Research and teaching: to show how a convolutional network trained on public chest "
    "X-ray collections separates COVID-19 from other radiographs, and where it looks. "
    "Not for diagnosis, triage or any clinical decision."
)
LIMITATIONS = [
    "Trained on public collections whose COVID-19 and non-COVID images come partly from "
    "different hospitals and age groups; such models are known to learn those shortcuts "
    "(DeGrave et al., Nature Machine Intelligence 2021).",
    "Probabilities are not calibrated to any clinical population's prevalence.",
    "Frontal (PA/AP) adult radiographs only; lateral views, CT and children are out of scope.",
]


def stored_metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """The evaluation figures stored with the model: its `metrics`, else the validation
    figures training kept (val_auc, ...). Test-set results live in the model card."""
    metrics = metadata.get("metrics") or {
        key: value for key, value in metadata.items() if key.startswith("val_")
    }
    return {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}


def _png(image: np.ndarray) -> schemas.ImagePNG:
    buffer = io.BytesIO()
    # Level 1: a 640 px heat-map overlay encodes in ~60 ms instead of ~350 ms at the default
    # level 6, for a file ~12 % larger (measured on a real radiograph).
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    height, width = image.shape[:2]
    return schemas.ImagePNG(
        png_base64=base64.b64encode(buffer.getvalue()).decode("ascii"), width=width, height=height
    )


def _scaled(box: Box | None, shape: tuple[int, ...], new_shape: tuple[int, ...]) -> Box | None:
    """The model's box on the radiograph, moved onto its scaled-down copy (None stays None)."""
    if box is None:
        return None
    return scale_box(box, (shape[0], shape[1]), (new_shape[0], new_shape[1]))


def _declares_large(data: bytes) -> bool:
    """Whether a PNG or JPEG header declares more than LARGE_PIXELS (Pillow reads only the
    header here): such an upload takes its turn before it is decoded, not only after."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image Pillow knows (DICOM, junk): judged after reading
        return False
    return width * height > LARGE_PIXELS


def _fit(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """The radiograph scaled down (area average) so its longest side is at most `max_side`."""
    height, width = pixels.shape
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(pixels.astype(np.float32, copy=False)).resize(
        size, Image.Resampling.BOX
    )
    return np.asarray(resized)


class Engine:
    """The loaded model plus the service's limits."""

    def __init__(self, predictor: Predictor, settings: ServiceSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        # Decoding, segmenting and preprocessing a large radiograph briefly hold several
        # full-size copies (pixels, lung logits and mask, the crop, Pillow's own); one large
        # image at a time, from decoding on when its header says so, keeps the server's peak
        # memory bounded with several inference workers, while small ones never wait.
        self._large = threading.Lock()

    @classmethod
    def load(cls, settings: ServiceSettings) -> Engine:
        from covid_cxr.inference.predictor import Predictor

        predictor = Predictor(
            settings.model,
            threads=settings.threads,
            operating_point=settings.operating_point,
            gate=settings.gate,
        )
        return cls(predictor, settings)

    @property
    def version(self) -> str:
        return str(self.predictor.version)

    @property
    def name(self) -> str:
        return self.predictor.info.name

    def read(self, upload: UploadedFile) -> Radiograph:
        from covid_cxr.imaging.read import read_radiograph, sniff_format

        name = upload.filename or "upload"
        if upload.too_large:
            raise too_large(name, self.settings.max_upload_bytes)
        if not upload.data:
            raise EmptyFileError(name, "the file is empty (0 bytes)", "choose the image itself")
        if sniff_format(upload.data) not in FORMATS:
            raise NotAnImageError(
                name,
                "not a PNG, JPEG or DICOM file",
                "the file's content is checked, not its name or declared type; "
                "save the radiograph as PNG, JPEG or DICOM",
            )
        return read_radiograph(upload.data, name=name, max_pixels=self.settings.max_pixels)

    def analyse(
        self, upload: UploadedFile, cam: bool, preview: bool, dicom: bool = False
    ) -> schemas.Prediction:
        start = time.perf_counter()
        # DICOM results carry the heat map too (in their Secondary Capture).
        heat = (cam or dicom) and self.predictor.cam_available
        declared = _declares_large(upload.data)
        with self._large if declared else contextlib.nullcontext():
            radiograph = self.read(upload)
            decoded = time.perf_counter()
            result = self._predict(radiograph, upload.filename, heat, turn_taken=declared)
        predicted = time.perf_counter()
        from covid_cxr.explain.gradcam import overlay

        crop = self.predictor.info.preprocess.crop
        small = _fit(radiograph.pixels, self.settings.image_max_side) if heat or preview else None
        heat_rgb = None
        if heat and small is not None:
            box = _scaled(result.box, radiograph.pixels.shape, small.shape)
            heat_rgb = overlay(small, result.cam, alpha=CAM_ALPHA, crop=crop, box=box)
        cam_png = _png(heat_rgb) if cam and heat_rgb is not None else None
        grey = grey_to_uint8(small) if preview else None
        preview_png = _png(grey) if preview else None
        dicom_results = self._dicom(radiograph, result, heat_rgb) if dicom else None
        done = time.perf_counter()
        timings = {k: float(v) for k, v in result.timings_ms.items() if k not in ("read", "total")}
        timings.update(
            read=(decoded - start) * 1000.0,
            render=(done - predicted) * 1000.0,
            total=(done - start) * 1000.0,
        )
        return schemas.Prediction(
            filename=upload.filename,
            probability=float(result.probability),
            label=result.label,
            positive=bool(result.positive),
            threshold=float(result.threshold),
            operating_point=self.predictor.operating_point,
            model_version=str(result.model_version),
            format=radiograph.format,
            width=radiograph.width,
            height=radiograph.height,
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            warnings=list(result.warnings),
            cam=cam_png,
            preview=preview_png,
            dicom=dicom_results,
        )

    def _predict(
        self, radiograph: Radiograph, name: str | None, heat: bool, *, turn_taken: bool
    ) -> Prediction:
        """Predict; a large radiograph whose header did not say so (DICOM) takes its turn now."""
        large = radiograph.width * radiograph.height > LARGE_PIXELS
        with self._large if large and not turn_taken else contextlib.nullcontext():
            return self.predictor.predict(radiograph, name=name, cam=heat)

    def _dicom(
        self, radiograph: Radiograph, result: Prediction, heat_rgb: np.ndarray | None
    ) -> schemas.DicomResults:
        """SR and SC in memory (never written here); the SC shows the heat map when the model
        has one, else the radiograph, at the size the `cam` image has."""
        from covid_cxr.dicom import build_results
        from covid_cxr.imaging.preprocess import grey_to_uint8

        if heat_rgb is None:
            grey = grey_to_uint8(_fit(radiograph.pixels, self.settings.image_max_side))
            heat_rgb = np.repeat(grey[..., None], 3, axis=2)
        built = build_results(
            radiograph,
            result,
            heat_rgb,
            self.predictor.info,
            operating_point=self.predictor.operating_point,
        )
        return schemas.DicomResults(
            sr_base64=base64.b64encode(built.sr_bytes()).decode("ascii"),
            sc_base64=base64.b64encode(built.sc_bytes()).decode("ascii"),
            study_instance_uid=str(built.sr.StudyInstanceUID),
            sr_sop_instance_uid=str(built.sr.SOPInstanceUID),
            sc_sop_instance_uid=str(built.sc.SOPInstanceUID),
            new_study=built.new_study,
        )

    def model_card(self, api_key_required: bool) -> schemas.ModelCard:
        info = self.predictor.info
        metadata = {k: v for k, v in (info.metadata or {}).items() if k not in PRIVATE_METADATA}
        settings = self.settings
        return schemas.ModelCard(
            name=info.name,
            version=str(info.version),
            runtime=self.predictor.runtime.kind,
            threshold=self.predictor.threshold,
            operating_point=self.predictor.operating_point,
            cam_available=self.predictor.cam_available,
            thresholds={k: float(v) for k, v in info.thresholds.items()},
            preprocess=info.preprocess.to_dict(),
            metrics=stored_metrics(metadata),
            model_card=MODEL_CARD if self.predictor.path.resolve().parent == SHIPPED else None,
            metadata=metadata,
            intended_use=INTENDED_USE,
            limitations=LIMITATIONS,
            notice=RESEARCH_NOTICE,
            service=schemas.ServiceLimits(
                max_upload_bytes=settings.max_upload_bytes,
                max_batch_files=settings.max_batch_files,
                max_batch_bytes=settings.max_batch_bytes,
                max_pixels=settings.max_pixels,
                formats=list(FORMATS),
                api_key_required=api_key_required,
            ),
        )
