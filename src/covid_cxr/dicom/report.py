"""The SR's content: a TID 1500 measurement report with one image-level TID 1501 group.

The group holds the finding (COVID-19 likely / not likely), the probability and the decision
threshold as measurements, the model as the algorithm (name, version, operating point as a
parameter) and the image it was computed on; a comment at the root carries the research-use
notice. Concepts without a standard code use the private scheme 99COVIDCXR, declared in the
SR's Coding Scheme Identification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from covid_cxr import RESEARCH_NOTICE

if TYPE_CHECKING:
    from covid_cxr.models.info import ModelInfo

SCHEME = "99COVIDCXR"
COVID19 = Code("840539006", "SCT", "COVID-19")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = Code("probability", SCHEME, "Probability of COVID-19")
THRESHOLD = Code("threshold", SCHEME, "Decision threshold")
LIKELY = Code("likely", SCHEME, "COVID-19 likely")
NOT_LIKELY = Code("not-likely", SCHEME, "COVID-19 not likely")
TRACKING_LABEL = "covid-cxr COVID-19 classification"


def coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="covid-cxr concepts",
        responsible_organization="covid-cxr contributors",
    )


def measurement_report(
    *,
    reported_on: Dataset,
    probability: float,
    threshold: float,
    positive: bool,
    operating_point: str,
    model_info: ModelInfo,
) -> hd.sr.MeasurementReport:
    """TID 1500 content for one classified image (`reported_on`: its UIDs)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_info.name,
        version=model_info.version,
        parameters=[f"operating point {operating_point}", f"threshold {threshold:.6g}"],
        manufacturer="covid-cxr",
    )
    unitless = codes.UCUM.NoUnits
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACKING_LABEL),
        finding_type=COVID19,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(PROBABILITY, float(probability), unitless, algorithm_id=algorithm),
            hd.sr.Measurement(THRESHOLD, float(threshold), unitless),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(COVID19, LIKELY if positive else NOT_LIKELY)
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                reported_on.SOPClassUID, reported_on.SOPInstanceUID
            )
        ],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same model is the same device: a UID derived from its version.
            uid=generate_uid(entropy_srcs=["covid-cxr", model_info.name, model_info.version]),
            name=model_info.name,
            manufacturer_name="covid-cxr",
            model_name=model_info.version,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=RESEARCH_NOTICE, relationship_type="CONTAINS"
        )
    )
    return report
