"""Results back to the PACS: one DICOM Structured Report per classified instance, by STOW-RS.

`dicomweb.store_sr=true` makes `SRStore` (called by the prediction writer for each batch)
build, for every instance with a prediction, a Comprehensive 3D SR with highdicom (TID 1500
Measurement Report holding one TID 1501 measurement group):

- observation context: device observer `regionnet`, model name = `regionnet/<backbone>`;
- procedure reported: SNOMED CT 168537006 "Plain radiography";
- measurement group: tracking identifier, algorithm identification (name, version =
  regionnet's version and the `model_id` of the prediction rows, parameters = the thresholds), and
  the source image (the classified instance's SOP Class and SOP Instance UIDs);
  - qualitative evaluation DCM 123014 "Target Region" = the predicted region as a SNOMED CT
    concept (`Region.snomed`), or SNOMED CT 261665006 "Unknown" when no head passes its
    threshold; regions without a SNOMED CT code use the local scheme `99REGIONNET`;
  - one measurement DCM 122157 "Probability" (UCUM "1") per head, its finding site the
    head's region.

The SR joins the source's study (Patient and Study attributes copied from the source), in a
new series (Modality SR, one per study and run); its evidence lists the source instance.
SRs go to `dicomweb.sr_url` (default: `dicomweb.url`) in batches of `dicomweb.batch_size`,
each prediction batch's SRs before its rows are written. Source instances are only ever read:
STOW-RS adds the SR instances and nothing else. An SR the server refuses (or cannot be sent)
is logged and counted (`sr_failed`), and its row says `sr_status=failed: <why>`; the
predictions are kept either way, and `resume=retry_errors` with `store_sr=true` stores the
missing SRs (and only those).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import generate_uid

from regionnet.decision import decide
from regionnet.dicomweb import DicomWebError, Server, reporting
from regionnet.model.identity import model_id, package_version
from regionnet.regions import UNKNOWN, region_info
from regionnet.writer import SR_STORED

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99REGIONNET"  # DICOM PS3.16 8.2: "99" designators are local code schemes
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "regionnet anatomical region"
# Type 2 Patient/Study attributes highdicom copies from the evidence; some radiographs lack them
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the model that made the prediction."""

    name: str
    version: str
    thresholds: tuple[float, ...]


def model_info(model, ckpt_path: str | Path, thresholds: Sequence[float]) -> ModelInfo:
    """Name `regionnet/<backbone>`; version `<regionnet version> model:<model_id>`, the same id
    as the prediction rows' `model_id` (`regionnet.model.identity.model_id`: the weights,
    thresholds and preprocessing), so an SR names the exact model."""
    return ModelInfo(
        name=f"regionnet/{model.hparams.backbone}",
        version=f"{package_version()} model:{model_id(model)}",
        thresholds=tuple(float(t) for t in thresholds),
    )


def region_concept(region: str):
    """The coded concept of a predicted region: SNOMED CT, `Unknown` for `unknown`."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    if region == UNKNOWN:
        return CodedConcept.from_code(codes.SCT.Unknown)
    info = region_info(region)
    if info is not None and info.snomed:
        return CodedConcept(info.snomed, "SCT", region.capitalize())
    return CodedConcept(region, LOCAL_SCHEME, region)


def build_sr(
    source: Dataset,
    probabilities: Sequence[float],
    regions: Sequence[str],
    model: ModelInfo,
    series_uid: str,
    instance_number: int,
):
    """A `highdicom.sr.Comprehensive3DSR` with the prediction for `source` (see module doc)."""
    import highdicom.sr as hsr
    from pydicom.sr.codedict import codes

    region, _ = decide(probabilities, model.thresholds, regions)
    evidence = copy.deepcopy(source)
    for keyword in _TYPE2:
        if keyword not in evidence:
            setattr(evidence, keyword, None)  # present and empty, as Type 2 allows
    algorithm = hsr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"threshold {r}={t:.6g}" for r, t in zip(regions, model.thresholds)],
    )
    observer = hsr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
            # one stable device UID per model version
            uid=generate_uid(entropy_srcs=[model.name, model.version]),
            name="regionnet",
            model_name=model.name,
        ),
    )
    measurements = [
        hsr.Measurement(
            name=codes.DCM.Probability,
            value=float(p),
            unit=codes.UCUM.NoUnits,
            finding_sites=[hsr.FindingSite(region_concept(r))],
        )
        for r, p in zip(regions, probabilities)
    ]
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"regionnet region of {source.SOPInstanceUID}"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hsr.QualitativeEvaluation(codes.DCM.TargetRegion, region_concept(region))
        ],
        source_images=[hsr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.PlainRadiography,
        imaging_measurements=[group],
    )
    return hsr.Comprehensive3DSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer="regionnet",
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
    )


class SRStore:
    """Builds the SRs of a prediction batch and STOW-RSes them, `batch_size` per request.

    `store(paths, probabilities, datasets)` needs `datasets` (path -> the instance without
    pixels, from `regionnet.dicomweb.DicomWebDataset(keep_datasets=True)`) and returns
    path -> `sr_status`: `stored`, or `failed: <why>`. The prediction writer calls it for each
    batch before writing the batch's rows, so a row says whether its SR is on the server and
    `resume=retry_errors` stores exactly the missing ones. `counts` has `sr_stored` and
    `sr_failed`; `stored` maps source SOP Instance UID -> SR SOP Instance UID.
    """

    def __init__(self, server: Server, regions: Sequence[str], model: ModelInfo, batch_size: int):
        try:
            import highdicom  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "dicomweb.store_sr=true needs highdicom: pip install -e '.[pacs]'"
            ) from e
        self.server = server
        self.regions = list(regions)
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.counts: Counter[str] = Counter()
        self.stored: dict[str, str] = {}
        self._series: dict[str, str] = {}  # study -> this run's SR series
        self._made = 0
        self._client = None

    def store(
        self,
        paths: Sequence[str],
        probabilities: Sequence[Sequence[float]],
        datasets: Mapping[str, Dataset],
    ) -> dict[str, str]:
        """Build and store the SRs of predicted instances; path -> `sr_status`."""
        status: dict[str, str] = {}
        pending: list[tuple[str, str, Dataset]] = []
        for path, probs in zip(paths, probabilities, strict=True):
            source = datasets.get(path)
            if source is None:
                status[path] = self._failed(path, "no DICOM header to build the SR from")
                continue
            try:
                series = self._series.setdefault(source.StudyInstanceUID, generate_uid())
                sr = build_sr(source, probs, self.regions, self.model, series, self._made + 1)
            except Exception as e:  # a malformed source header costs its SR only
                status[path] = self._failed(path, f"cannot build the SR: {e}")
                continue
            self._made += 1
            pending.append((path, source.SOPInstanceUID, sr))
        for i in range(0, len(pending), self.batch_size):
            status.update(self._stow(pending[i : i + self.batch_size]))
        return status

    def _failed(self, path: str, why: str, n: int = 1) -> str:
        why = " ".join(str(why).split())
        log.warning("store_sr: no SR stored for %s: %s", path, why)
        self.counts["sr_failed"] += n
        return f"failed: {why}"

    def _stow(self, pending: list[tuple[str, str, Dataset]]) -> dict[str, str]:
        """STOW-RS the SRs in one request; path -> `sr_status`."""
        try:
            if self._client is None:
                self._client = self.server.client()
            with reporting(self.server, "STOW-RS of the SRs"):
                response = self._client.store_instances([sr for _, _, sr in pending])
        except (DicomWebError, ValueError) as e:
            return {path: self._failed(path, e) for path, _, _ in pending}
        failed = {
            item.ReferencedSOPInstanceUID: item.get("FailureReason")
            for item in response.get("FailedSOPSequence", [])
        }
        status = {}
        for path, source_uid, sr in pending:
            if sr.SOPInstanceUID in failed:
                reason = failed[sr.SOPInstanceUID]
                code = f" (FailureReason 0x{int(reason):04X})" if reason is not None else ""
                status[path] = self._failed(path, f"the server refused the SR{code}")
            else:
                self.stored[source_uid] = sr.SOPInstanceUID
                self.counts["sr_stored"] += 1
                status[path] = SR_STORED
        return status
