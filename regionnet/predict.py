"""`predict(cfg)`: which region does each radiograph show? Batch prediction to CSV or JSONL.

    regionnet-predict ckpt_path=.../best.ckpt input=PATH output=preds.csv

`input` is a radiograph, a folder (searched recursively by
`regionnet.data.files.list_radiographs`: files with an image suffix, plus DICOM files without
one, detected by their `DICM` magic; hidden files skipped), a CSV with a `path` column
(relative paths resolve against the CSV's folder; a listed file that is not a radiograph
format gets an error row naming the supported formats), or `dicomweb`: the CR/DX instances a
DICOMweb server (`dicomweb.url`, filters in `dicomweb.*`) finds, retrieved into memory
(`regionnet.dicomweb`); their rows carry Study/Series/SOP Instance UIDs and the path
`dicomweb://<study>/<series>/<sop>`. Files are read and preprocessed exactly as
in training, batched through Lightning's prediction loop, and written row by row by
`regionnet.writer.PredictionWriter` (columns documented there). A file that cannot be read
gets a row with `status=error: <why>`; the run goes on and exits 0. `resume=true` skips the
paths already in `output`; `resume=retry_errors` also predicts the paths of its error rows
again (the old error rows are removed, the file rewritten atomically) and, with
`dicomweb.store_sr=true`, the instances whose SR was not stored (`sr_status`); without
resume an existing output is overwritten. One run writes an output at a time: a second one on
the same file stops at once (`regionnet.writer.output_lock`, a lock on `<output>.lock`).

Every row carries the `model_id` of the model that made it (`model_id`: 12 hex digits of
the SHA-256 of the weights, thresholds and preprocessing; the same for a checkpoint copied,
renamed or rewritten by Lightning with other metadata). `resume` into an output holding rows
of another model (or rows without a model id) stops with both ids, unless
`resume_other_model=true`.

Options: `audit=true` compares DICOM BodyPartExamined with the prediction;
`dicom.write_body_part=DIR` writes re-tagged DICOM copies as new instances (inputs are never
modified; `dicom.write_body_part_mode` fill_empty/mismatch_margin/all decides which headers
may change, see `regionnet.dicom_tags`; the `body_part_status` column says what happened);
`cam=true cam_dir=DIR` saves labelled class activation maps (`CamMaker`), batch by batch
inside the predict loop; `threshold_override` replaces the checkpoint's thresholds;
`precision=bf16-mixed`, `channels_last=true` for speed on GPUs; `backend=onnxruntime` runs
the checkpoint exported to ONNX through ONNX Runtime on the CPU, same rows within 1e-4
(`regionnet.backends`; the `export` extra; `onnx_path=FILE` runs an exported file such as
`model.int8.onnx`); `dicomweb.store_sr=true`
writes a DICOM SR per instance back to the PACS (`regionnet.sr`); `group_by=study` also
writes one row per study (`regionnet.study_view`).

A landmark checkpoint (`task=landmarks`) writes one row per film with its points and angles
instead (`regionnet.landmarks.predict`; `cam=true cam_dir=DIR` draws them); a box checkpoint
(`task=boxes`) one row per film with its vertebra boxes (`regionnet.boxes.predict`).

A folder input never lists this run's own output folders (`cam_dir`,
`dicom.write_body_part`) when they lie inside it, so that maps and copies are not predicted
by the next run (`exclude_outputs`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from regionnet.api import load_checkpoint
from regionnet.backends import (
    OnnxRuntimeModule,
    backend_name,
    check_onnxruntime_options,
    onnx_file_model,
)
from regionnet.boxes.infer import attach_detector, load_box_model
from regionnet.boxes.predict import predict_boxes
from regionnet.compose.infer import PartCells, load_multi_model
from regionnet.data.dataset import (
    RadiographDataset,
    collate,
    load_image,
    loader_threads,
    usable_cores,
)
from regionnet.data.files import SUPPORTED_FORMATS, list_radiographs
from regionnet.data.transforms import eval_transform
from regionnet.decision import resolve_thresholds
from regionnet.dicom_tags import body_part_mode, mirrored_path
from regionnet.io import IMAGE_EXTENSIONS
from regionnet.landmarks.infer import LandmarkReader, load_landmark_model
from regionnet.landmarks.infer import collate as landmark_collate
from regionnet.landmarks.predict import predict_landmarks
from regionnet.model.checkpoint import checkpoint_task
from regionnet.model.identity import model_id
from regionnet.regions import UNKNOWN
from regionnet.study_view import GROUP_BY, write_study_view
from regionnet.writer import (
    SR_STORED,
    PredictionWriter,
    ResumeState,
    output_lock,
    prediction_columns,
    read_done,
)

log = logging.getLogger(__name__)

RETRY_ERRORS = "retry_errors"


def resume_mode(value) -> bool | str:
    """`resume`: false, true or retry_errors (see the module docstring)."""
    text = str(value).strip().lower() if value is not None else "false"
    if text in ("false", "0", "none", ""):
        return False
    if text in ("true", "1"):
        return True
    if text == RETRY_ERRORS:
        return RETRY_ERRORS
    raise ValueError(
        f"resume={value!r}: choose false (overwrite), true (skip the paths already in output) "
        "or retry_errors (also predict the error rows again and, with dicomweb.store_sr=true, "
        "store the SRs not stored yet)"
    )


def _absolute(path: str | Path) -> str:
    """Absolute path without resolving symlinks: the key `resume` matches on."""
    return str(Path(path).expanduser().absolute())


def folder_inputs(root: Path) -> list[str]:
    """Radiographs under `root` (`list_radiographs`), as absolute paths."""
    return [_absolute(f) for f in list_radiographs(root)]


def csv_inputs(csv_path: Path) -> list[str]:
    """The `path` column of a CSV; relative paths resolve against the CSV's folder.

    Every listed path is predicted: one that does not exist or is not a radiograph format
    (`regionnet.io.is_radiograph_file`, the rule folder listings apply) gets an error row."""
    df = pd.read_csv(csv_path, dtype={"path": str})
    if "path" not in df:
        raise ValueError(f"input={str(csv_path)!r}: needs a 'path' column; has {list(df.columns)}")
    paths = df["path"].dropna().str.strip()
    if len(paths) < len(df):
        log.warning("%s: %d rows without a path skipped", csv_path, len(df) - len(paths))
    base = csv_path.parent
    return [p if p.startswith("phantom://") else _absolute(base / p) for p in paths if p]


def collect_inputs(
    input_path: str | Path, exclude: dict[str, Path | None] | None = None
) -> tuple[list[str], Path | None]:
    """(radiograph paths, the folder whose layout output copies mirror) for `input`.

    `exclude` ({option name: folder}): this run's output folders; those inside a folder input
    are left out of its listing (`exclude_outputs`). A CSV lists its files by hand: nothing
    is left out of it."""
    path = Path(str(input_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input={str(input_path)!r} does not exist; give a radiograph, a folder of them or "
            "a CSV with a 'path' column"
        )
    if path.is_dir():
        paths, root = folder_inputs(path), path.absolute()
        paths = exclude_outputs(paths, root, exclude or {})
    elif path.suffix.lower() == ".csv":
        paths, root = csv_inputs(path), path.absolute().parent
    else:
        paths, root = [_absolute(path)], path.absolute().parent
    if not paths:
        raise ValueError(f"input={str(input_path)!r} holds no radiographs ({SUPPORTED_FORMATS})")
    return paths, root


def _normal(path: str | Path) -> Path:
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def exclude_outputs(paths: list[str], root: Path, folders: dict[str, Path | None]) -> list[str]:
    """`paths` (listed under the input folder `root`) without the files inside this run's
    output folders ({option: folder}, e.g. cam_dir, dicom.write_body_part) that lie inside
    `root`, named by their path or through symlinks; one log line per folder. The input
    folder itself as an output folder raises: every input would be left out."""
    root_n, root_r = _normal(root), Path(os.path.realpath(root))
    prefixes: list[tuple[str, Path]] = []
    for option, folder in folders.items():
        if folder is None:
            continue
        spelled, real = _normal(folder), Path(os.path.realpath(folder))
        inside = {spelled} if spelled.is_relative_to(root_n) else set()
        if real.is_relative_to(root_r):  # the same folder reached through a link
            inside.add(root_n / real.relative_to(root_r))
        if root_n in inside:
            raise ValueError(
                f"{option}={str(folder)!r} is the input folder; choose another folder (its "
                "files would be predicted by the next run, and inputs are never modified)"
            )
        prefixes += [(option, d) for d in sorted(inside)]
    if not prefixes:
        return paths
    left_out: Counter[tuple[str, Path]] = Counter()
    kept = []
    for p in paths:
        hit = next(((o, d) for o, d in prefixes if Path(p).is_relative_to(d)), None)
        if hit is None:
            kept.append(p)
        else:
            left_out[hit] += 1
    for option, folder in prefixes:
        log.info(
            "input: %s=%s is inside the input folder; its %d files (this run's output) are "
            "not predicted",
            option,
            folder,
            left_out[(option, folder)],
        )
    return kept


# -- the model's id --------------------------------------------------------------------------
# hyperparameters that change a prediction besides the weights (the input the model sees)
# -- class activation maps ---------------------------------------------------------------------
class CamMaker:
    """Class activation maps of a predict run, made batch by batch inside the predict loop
    (`PredictionWriter` calls `make` right after writing a batch's rows), so an interrupted
    run keeps every map made so far.

    A map goes to `<cam_dir>/<the input's layout>/<name>_<region>.png` (`path_for`; `name`
    is the file name without an image suffix; phantom URIs are flattened): the Grad-CAM of
    the deciding head (the most probable one for `unknown`) over the original radiograph,
    with `regionnet.cam.label_overlay`'s strip below it (region, probability, colour bar).
    The gradient is taken on the model's device, from the batch's images already there; the
    original pixels are read again for the overlay. `only` ({path: (region, head index,
    probability)}): rows of an earlier run (resume) whose map is missing; they go through the
    loop for their map alone. `counts`: `cam_written`, `cam_failed` (also logged), and
    `cam_resumed` (the maps among `cam_written` made for rows of an earlier run).
    """

    def __init__(self, cam_dir: Path, root: Path | None, phantom_size: int, only=None):
        self.cam_dir = Path(cam_dir)
        self.root = root
        self.phantom_size = int(phantom_size)
        self.only: dict[str, tuple[str, int, float]] = dict(only or {})
        self.counts: Counter[str] = Counter()

    def path_for(self, path: str, region: str) -> Path:
        if path.startswith("phantom://"):
            return self.cam_dir / f"{path[len('phantom://') :].replace('/', '_')}_{region}.png"
        src = mirrored_path(path, self.root, self.cam_dir)
        name = src.stem if src.suffix.lower() in IMAGE_EXTENSIONS else src.name  # 1.2.840.5
        return src.with_name(f"{name}_{region}.png")

    def failed(self, path: str, why: str) -> None:
        log.warning("cam: no class activation map for %s: %s", path, why)
        self.counts["cam_failed"] += 1

    def make(self, model, paths: list[str], images, items) -> None:
        """Maps for `items` [(path, region, head, probability)] of one batch; `images`: the
        batch's model inputs (B, C, S, S), row i for `paths[i]`."""
        from regionnet.cam import cam_overlay, label_overlay, save_png

        index = {p: i for i, p in enumerate(paths)}
        heads = list(model.regions)
        for path, region, head, prob in items:
            try:
                pixels = load_image(path, self.phantom_size)
                image = images[index[path]][None]
                with torch.enable_grad():
                    overlay = cam_overlay(model, image, head, pixels)
                text = (
                    f"{region} p={prob:.2f}"
                    if region != UNKNOWN
                    else f"unknown ({heads[head]} p={prob:.2f})"
                )
                dst = self.path_for(path, region)
                dst.parent.mkdir(parents=True, exist_ok=True)
                save_png(label_overlay(overlay, text), dst)
            except Exception as e:  # a failed map must not cost the predictions
                self.failed(path, f"{type(e).__name__}: {e}")
                continue
            self.counts["cam_written"] += 1
            if path in self.only:
                self.counts["cam_resumed"] += 1


def _check_cam(cfg: DictConfig) -> Path | None:
    if not cfg.get("cam"):
        return None
    if not cfg.get("cam_dir"):
        raise ValueError("cam=true needs cam_dir=DIR, the folder for the class activation maps")
    try:
        import regionnet.cam  # noqa: F401
    except ImportError as e:
        raise ValueError(f"cam=true needs regionnet.cam, which cannot be imported ({e})") from e
    return Path(str(cfg.cam_dir)).expanduser().absolute()


def missing_maps(cams: CamMaker, rows: dict[str, dict], regions: list[str]) -> dict:
    """{path: (region, head, probability)} of the ok rows of an earlier run (`rows`: path ->
    row) whose map is not in `cam_dir`: the maps a resumed `cam=true` run makes."""
    missing = {}
    for path, row in rows.items():
        region = str(row.get("region") or "")
        if row.get("status") != "ok" or not region:
            continue
        try:
            probs = [float(row[f"p_{r}"]) for r in regions]
            if cams.path_for(path, region).is_file():
                continue
        except (KeyError, TypeError, ValueError) as e:
            log.warning("cam: cannot tell whether %s has a map: %s", path, e)
            continue
        if region in regions:
            head = regions.index(region)
        else:  # unknown: the most probable head, as when the row was made
            head = max(range(len(regions)), key=lambda k: probs[k])
        missing[path] = (region, head, probs[head])
    return missing


class StageClock(L.Callback):
    """Where the predict loop's time goes: the reader (each file's read and transform, timed
    in the data loader worker that did it: `read_seconds` of the batch) and the model (from
    a batch's start on its device to its predictions on the CPU). Placed before the writer,
    so rows, copies and maps count for neither."""

    def __init__(self) -> None:
        self.read_seconds = self.model_seconds = 0.0
        self.films = self.batches = 0
        self._start = 0.0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if isinstance(batch, dict):
            self.read_seconds += float(batch.get("read_seconds", 0.0))
            self.films += len(batch.get("path", ())) + len(batch.get("errors", ()))
        self._start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.model_seconds += time.perf_counter() - self._start
        self.batches += 1

    def summary(self, workers: int) -> dict:
        """`read_seconds` (summed over files, in the workers), `model_seconds`, per film in
        ms, and `bound`: reader when the workers together read a film slower than the model
        runs one (with no worker they take turns: the larger share)."""
        n = max(1, self.films)
        read_ms, model_ms = 1000 * self.read_seconds / n, 1000 * self.model_seconds / n
        bound = "reader" if read_ms / max(1, workers) > model_ms else "model"
        return {
            "read_seconds": self.read_seconds,
            "read_ms_per_film": read_ms,
            "model_seconds": self.model_seconds,
            "model_ms_per_film": model_ms,
            "model_batches": self.batches,
            "bound": bound if self.films else "",
        }


@contextmanager
def _torch_threads():
    """Give back the caller's torch intra-op thread count when predict ends."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"regionnet-predict: {summary['output']}")
    table.add_column("outcome")
    table.add_column("radiographs", justify="right")
    for name, n in summary["regions"].items():
        table.add_row(name, str(n))
    table.add_row("error (unreadable)", str(summary["errors"]))
    if summary["resumed"]:
        table.add_row("already done (resume)", str(summary["resumed"]))
    if summary.get("retried"):
        table.add_row("predicted again (retry_errors)", str(summary["retried"]))
    if summary.get("sr_stored") or summary.get("sr_failed"):
        table.add_row("SRs stored (STOW-RS)", str(summary["sr_stored"]))
        table.add_row("SRs not stored", str(summary["sr_failed"]))
    if summary.get("body_part"):
        for outcome in ("written", "kept", "skipped", "failed"):
            n = summary[f"body_part_{outcome}"]
            table.add_row(f"DICOM copies {outcome} (body_part_status)", str(n))
    if summary.get("cam"):
        table.add_row("class activation maps made", str(summary["cam_written"]))
        if summary["cam_resumed"]:
            table.add_row("  of them for rows of an earlier run", str(summary["cam_resumed"]))
        table.add_row("class activation maps failed", str(summary["cam_failed"]))
    if summary.get("study_output"):
        table.add_row(f"studies ({summary['study_output']})", str(summary["studies"]))
    console = Console()
    console.print(table)
    maps = f", {summary['cam_written']} maps included" if summary.get("cam") else ""
    console.print(
        f"{summary['ok']} ok ({summary['unknown']} unknown), {summary['errors']} errors; "
        f"{summary['per_second']:.1f} radiographs/s ({summary['seconds']:.1f} s{maps}); "
        f"model {summary['model_id']} ({summary.get('backend', 'torch')})"
    )
    if summary.get("bound"):
        workers, threads = summary["num_workers"], summary["torch_threads"]
        console.print(
            f"{summary['bound']}-bound: {summary['read_ms_per_film']:.1f} ms/film reading "
            f"({workers} reader worker{'s' * (workers != 1)}) vs "
            f"{summary['model_ms_per_film']:.1f} ms/film model ({threads} torch "
            f"thread{'s' * (threads != 1)})"
        )


def finding_specs(model) -> dict[str, tuple[str, float | tuple[str, ...]]]:
    """Finding name -> (its region, its threshold) of a checkpoint's binary finding heads,
    (its region, its grades) of its ordinal ones."""
    names = list(getattr(model, "findings", []))
    if not names:
        return {}
    specs = [model.hparams.findings[f] for f in names]
    thresholds = model.finding_thresholds.tolist()
    return {
        f: (s["region"], tuple(s["grades"]) if "grades" in s else float(t))
        for f, s, t in zip(names, specs, thresholds, strict=True)
    }


def predict_trainer_config(cfg: DictConfig) -> dict:
    """The `trainer:` node (accelerator, precision, ...) for Lightning's predict loop; one
    device, because one process writes the output file in input order."""
    node = cfg.get("trainer")
    kwargs = {
        "accelerator": str(cfg.get("accelerator", "auto")),
        "precision": cfg.get("precision", "32-true"),
        **(OmegaConf.to_container(node, resolve=True) if node is not None else {}),
    }
    if kwargs.setdefault("devices", 1) not in (1, "1", [0]):
        raise ValueError(
            f"trainer.devices={kwargs['devices']!r}: regionnet-predict runs on one device (one "
            "process writes the output file); use trainer.devices=1"
        )
    return kwargs


def predict(cfg: DictConfig, callbacks=()) -> dict:
    """Predict the region of every radiograph in `cfg.input`; write `cfg.output`.

    Returns a summary: counts `ok`, `unknown`, `errors`, `regions` (radiographs per
    predicted region), `resumed`, `retried` (rows of `output` predicted again by
    `resume=retry_errors`); with `dicom.write_body_part`, `body_part_written`, `_kept`,
    `_skipped`, `_failed` (the `body_part_status` outcomes); with `cam=true`, `cam_written`
    (of which `cam_resumed` for rows of an earlier run) and `cam_failed`; `model_id`;
    `seconds` of the predict loop (reading, the model, rows, copies and maps all included)
    and `per_second` (radiographs through the loop, map-only ones of a resume included);
    where its time went (`StageClock`): `read_seconds` and `read_ms_per_film` (reading and
    transforming, summed over the reader workers), `model_seconds` and `model_ms_per_film`,
    `bound` (reader or model), with `num_workers` and `torch_threads` (`loader_threads`:
    chosen from the usable cores where the config says auto);
    `output`. `callbacks`: more Lightning callbacks for the predict loop, after the writer.
    Raises `regionnet.writer.OutputLockedError` when another run is writing `output`, and
    `regionnet.writer.OtherModelError` when `resume` meets rows of another model.
    """
    output = Path(str(cfg.output)).expanduser()
    resume = resume_mode(cfg.get("resume"))
    with output_lock(output), _torch_threads():
        return _predict(cfg, output, resume, list(callbacks))


def _predict(cfg: DictConfig, output: Path, resume: bool | str, callbacks) -> dict:
    group_by = cfg.get("group_by")
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}: choose null or study")
    audit = bool(cfg.get("audit")) or group_by == "study"  # the study view needs the audit
    web_cfg = cfg.get("dicomweb") or {}
    dicom_cfg = cfg.get("dicom") or {}
    mode, margin = body_part_mode(
        dicom_cfg.get("write_body_part_mode"), dicom_cfg.get("mismatch_margin")
    )
    body_part_dir = dicom_cfg.get("write_body_part") or None
    server = None
    if str(cfg.input) == "dicomweb":
        _check_dicomweb_options(cfg)
        from regionnet.dicomweb import dicomweb_inputs

        server, paths = dicomweb_inputs(web_cfg)
        root, cam_dir = None, None
    else:
        body_part_dir = _normal(str(body_part_dir)) if body_part_dir else None
        cam_dir = _check_cam(cfg)
        outputs = {"dicom.write_body_part": body_part_dir, "cam_dir": cam_dir}
        paths, root = collect_inputs(cfg.input, outputs)  # leaves out this run's outputs
        if body_part_dir is not None and body_part_dir == _normal(root):
            raise ValueError(
                f"dicom.write_body_part={str(body_part_dir)!r} is the input folder; choose "
                "another folder (inputs are never modified)"
            )
    store_sr = server is not None and bool(web_cfg.get("store_sr"))

    ckpt = cfg.get("ckpt_path")
    task = checkpoint_task(ckpt) if ckpt and not cfg.get("onnx_path") else "regions"
    backend = backend_name(cfg.get("backend")) if task == "regions" else "torch"
    if task == "multi" and backend_name(cfg.get("backend")) != "torch":
        raise ValueError(
            f"backend={cfg.get('backend')}: a model with landmark or box parts (task=multi) "
            "runs on backend=torch only"
        )
    if task == "multi" and server is not None:
        raise ValueError(
            "input=dicomweb is for region models; give a model with landmark or box parts "
            "(task=multi) files or a folder"
        )
    # before any ONNX Runtime session is made: it takes torch's thread count. Every head type
    # reads with the same rule (regionnet.data.dataset.loader_threads)
    gpu = backend == "torch" and torch.cuda.is_available()
    gpu = gpu and predict_trainer_config(cfg)["accelerator"] not in ("cpu",)
    workers, threads = loader_threads(cfg.get("num_workers"), cfg.get("torch_threads"), gpu=gpu)
    torch.set_num_threads(threads)
    log.info(
        "predict: %d cores -> %d reader worker%s, %d torch thread%s",
        usable_cores(),
        workers,
        "s" * (workers != 1),
        threads,
        "s" * (threads != 1),
    )
    if task in ("landmarks", "boxes"):
        # landmark or box heads: the same inputs, reader and predict loop, their own rows
        if server is not None:
            raise ValueError("input=dicomweb is for region models; give files or a folder")
        load, run = (
            (load_landmark_model, predict_landmarks)
            if task == "landmarks"
            else (load_box_model, predict_boxes)
        )
        model = load(ckpt)
        if cfg.get("refine_detector"):
            if task != "landmarks":
                raise ValueError("refine_detector= is for two-step landmark checkpoints")
            attach_detector(model, cfg.refine_detector)
        chosen = OmegaConf.merge(cfg, {"num_workers": workers, "torch_threads": threads})
        return run(chosen, model, paths, output, predict_trainer_config(cfg), cam_dir)

    if cfg.get("onnx_path"):  # an exported file: its model_id (regionnet.backends)
        if backend != "onnxruntime":
            raise ValueError("onnx_path needs backend=onnxruntime")
        model, runner, mid = onnx_file_model(cfg, load_checkpoint)
        source = f"onnx_path={cfg.onnx_path}"
        log.info("backend=onnxruntime: %s (model %s) run on the CPU", cfg.onnx_path, mid)
    else:
        model = load_multi_model(ckpt) if task == "multi" else load_checkpoint(cfg.ckpt_path)
        mid = model_id(model)  # before any precision or memory-format change
        runner, source = model, f"ckpt_path={cfg.ckpt_path}"
    if backend == "onnxruntime" and runner is model:  # exported: the same model_id
        check_onnxruntime_options(cfg, model)
        runner = OnnxRuntimeModule.from_regionnet(model)
        log.info("backend=onnxruntime: model %s exported to ONNX, run on the CPU", mid)
    regions = list(model.regions)
    override = cfg.get("threshold_override")
    if isinstance(override, DictConfig | ListConfig):
        override = OmegaConf.to_container(override, resolve=True)
    thresholds = resolve_thresholds(model.thresholds.tolist(), regions, override)
    log.info("model %s: heads %s, thresholds %s", mid, regions, [round(t, 4) for t in thresholds])
    cams = CamMaker(cam_dir, root, int(model.hparams.image_size)) if cam_dir else None
    findings = finding_specs(model)
    parts = PartCells(model) if task == "multi" else None

    resumed, state = 0, ResumeState()
    if output.exists():
        if resume:
            redo = _redo(store_sr, set(paths)) if resume == RETRY_ERRORS else None
            columns = prediction_columns(
                regions,
                audit,
                server is not None,
                body_part=body_part_dir is not None,
                findings=findings,
                parts=parts.columns if parts is not None else (),
            )
            done = read_done(
                output,
                columns,
                redo,
                state,
                model_id=mid,
                other_model=bool(cfg.get("resume_other_model")),
                model_source=source,
                keep_rows=cams is not None,
            )
            others = {m: n for m, n in state.models.items() if m != mid}
            if others:
                log.warning(
                    "resume_other_model=true: appending rows of model %s to %s, which holds "
                    "rows of %s",
                    mid,
                    output,
                    ", ".join(f"{m or 'no recorded model'} ({n})" for m, n in others.items()),
                )
            resumed = sum(p in done for p in paths)
            if cams is not None:
                inputs = set(paths)
                rows = {p: r for p, r in state.rows.items() if p in inputs}
                cams.only = missing_maps(cams, rows, regions)
                state.rows = {}
                if cams.only:
                    log.info(
                        "cam: %d rows already in %s have no map in %s; making them",
                        len(cams.only),
                        output,
                        cam_dir,
                    )
            todo = [p for p in paths if p not in done]
            log.info(
                "resume: %d of %d radiographs already in %s", resumed, resumed + len(todo), output
            )
            if state.redone:
                log.info("resume=retry_errors: %d rows of %s predicted again", state.redone, output)
            elif state.errors or state.sr_missing:
                log.warning(
                    "resume: %s keeps %d error rows and %d SRs not stored; "
                    "resume=retry_errors predicts them again",
                    output,
                    state.errors,
                    state.sr_missing,
                )
            # the rows to predict, and the rows of the earlier run that need a map only
            paths = [p for p in paths if p not in done or (cams is not None and p in cams.only)]
        else:
            log.warning("overwriting %s (set resume=true to continue it instead)", output)

    sr_store = _sr_store(cfg, model, regions, thresholds) if store_sr else None
    writer = PredictionWriter(
        output,
        regions,
        thresholds,
        append=bool(resume),
        audit=audit,
        body_part_dir=body_part_dir,
        input_root=root,
        body_part_mode=mode,
        mismatch_margin=margin,
        new_series_uid=bool(dicom_cfg.get("new_series_uid")),
        cams=cams,
        uids=server is not None,
        sr_store=sr_store,
        model_id=mid,
        findings=findings,
        parts=parts,
    )
    seconds, clock = 0.0, StageClock()
    if paths:
        if cfg.get("channels_last") and backend == "torch":
            model.net.channels_last = True  # forward_features converts each batch
            model = model.to(memory_format=torch.channels_last)
        batch_size, collate_fn = int(cfg.batch_size), collate
        if server is not None:
            from regionnet.dicomweb import DicomWebDataset, dicomweb_collate

            dataset = DicomWebDataset(
                server,
                paths,
                eval_transform(model),
                keep_datasets=store_sr,
                target=int(model.hparams.image_size),
            )
            batch_size = int(web_cfg.get("batch_size") or batch_size)
            collate_fn = dicomweb_collate
        elif parts is not None:  # full size, with each film's letterbox: points in its pixels
            dataset, collate_fn = LandmarkReader(paths, model), landmark_collate
        else:
            dataset = RadiographDataset(
                pd.DataFrame({"path": paths}),
                regions,
                eval_transform(model),
                phantom_size=int(model.hparams.image_size),
                target=int(model.hparams.image_size),  # decoded at reduced size
            )
        trainer_cfg = predict_trainer_config(cfg)
        if backend == "onnxruntime":  # ONNX Runtime's CPU provider: batches stay on the CPU
            trainer_cfg.update(accelerator="cpu", precision="32-true")
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available() and trainer_cfg["accelerator"] != "cpu",
        )
        trainer = L.Trainer(
            **trainer_cfg,
            logger=False,
            callbacks=[clock, writer, *callbacks],
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=str(output.parent),
        )
        # the clock covers the whole loop: reading, the model, writing rows, copies and maps
        start = time.perf_counter()
        trainer.predict(runner, dataloaders=loader, return_predictions=False)
        seconds = time.perf_counter() - start
    else:
        writer.write_rows([])  # an up-to-date resume still leaves a valid output file
        writer.teardown(None, None, "predict")

    counts: Counter[str] = writer.counts
    per_region = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("region:")}
    done = counts["ok"] + counts["error"]
    cam_counts = cams.counts if cams is not None else Counter()
    handled = done + len(cams.only) if cams is not None else done  # map-only rows went through
    summary = {
        "ok": counts["ok"],
        "unknown": per_region.get(UNKNOWN, 0),
        "errors": counts["error"],
        "regions": dict(sorted(per_region.items())),
        "resumed": resumed,
        "retried": state.redone,
        "body_part": body_part_dir is not None,
        "body_part_written": counts["body_part_written"],
        "body_part_kept": counts["body_part_kept"],
        "body_part_skipped": counts["body_part_skipped"],
        "body_part_failed": counts["body_part_failed"],
        "cam": cams is not None,
        "cam_written": cam_counts["cam_written"],
        "cam_resumed": cam_counts["cam_resumed"],
        "cam_failed": cam_counts["cam_failed"],
        "model_id": mid,
        "backend": backend,
        "seconds": seconds,
        "per_second": handled / seconds if seconds > 0 else 0.0,
        "output": str(output),
        "num_workers": workers,
        "torch_threads": threads,
        **clock.summary(workers),
    }
    if cams is not None:
        log.info("cam: %d class activation maps in %s", cam_counts["cam_written"], cam_dir)
    if sr_store is not None:
        summary.update(
            sr_stored=sr_store.counts["sr_stored"], sr_failed=sr_store.counts["sr_failed"]
        )
    if group_by == "study":
        study_path, studies = write_study_view(output, regions)
        summary.update(study_output=str(study_path), studies=len(studies))
    print_summary(summary)
    return summary


def _redo(store_sr: bool, inputs: set[str]):
    """The rows `resume=retry_errors` predicts again: those of this run's inputs that are
    error rows or, when SRs are stored, whose SR is not (`sr_status` other than `stored`).
    Rows of paths this run does not list (an instance gone from the PACS) stay."""

    def redo(row: dict) -> bool:
        if row.get("path") not in inputs:
            return False
        if str(row.get("status", "")).startswith("error"):
            return True
        return store_sr and row.get("sr_status") != SR_STORED

    return redo


def _check_dicomweb_options(cfg: DictConfig) -> None:
    """Options that work on files only."""
    if (cfg.get("dicom") or {}).get("write_body_part"):
        raise ValueError(
            "dicom.write_body_part writes file copies and does not apply to input=dicomweb; "
            "use dicomweb.store_sr=true to write the regions back as DICOM SR"
        )
    if cfg.get("cam"):
        raise ValueError("cam=true needs files; it does not apply to input=dicomweb")


def _sr_store(cfg: DictConfig, model, regions: list[str], thresholds: list[float]):
    """The SR callback for `dicomweb.store_sr=true` (to `dicomweb.sr_url` or `dicomweb.url`)."""
    from regionnet.dicomweb import Server
    from regionnet.sr import SRStore, model_info

    web_cfg = cfg.dicomweb
    sr_url = web_cfg.get("sr_url")
    server = Server.from_config(
        web_cfg, url=sr_url or None, key="dicomweb.sr_url" if sr_url else "dicomweb.url"
    )
    info = model_info(model, cfg.ckpt_path, thresholds)
    return SRStore(server, regions, info, int(web_cfg.get("batch_size") or cfg.batch_size))
