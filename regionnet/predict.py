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

Options: `audit=true` compares DICOM BodyPartExamined with the prediction;
`dicom.write_body_part=DIR` writes corrected DICOM copies (inputs are never modified);
`cam=true cam_dir=DIR` saves class activation maps; `threshold_override` replaces the
checkpoint's thresholds; `precision=bf16-mixed`, `channels_last=true` for speed on GPUs;
`dicomweb.store_sr=true` writes a DICOM SR per instance back to the PACS (`regionnet.sr`);
`group_by=study` also writes one row per study (`regionnet.study_view`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from regionnet.api import load_checkpoint
from regionnet.data.dataset import RadiographDataset, collate, load_image
from regionnet.data.files import SUPPORTED_FORMATS, list_radiographs
from regionnet.data.transforms import eval_transform
from regionnet.decision import resolve_thresholds
from regionnet.dicom_tags import mirrored_path
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


def collect_inputs(input_path: str | Path) -> tuple[list[str], Path | None]:
    """(radiograph paths, the folder whose layout output copies mirror) for `input`."""
    path = Path(str(input_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input={str(input_path)!r} does not exist; give a radiograph, a folder of them or "
            "a CSV with a 'path' column"
        )
    if path.is_dir():
        paths, root = folder_inputs(path), path.absolute()
    elif path.suffix.lower() == ".csv":
        paths, root = csv_inputs(path), path.absolute().parent
    else:
        paths, root = [_absolute(path)], path.absolute().parent
    if not paths:
        raise ValueError(f"input={str(input_path)!r} holds no radiographs ({SUPPORTED_FORMATS})")
    return paths, root


def _check_cam(cfg: DictConfig) -> Path | None:
    if not cfg.get("cam"):
        return None
    if not cfg.get("cam_dir"):
        raise ValueError("cam=true needs cam_dir=DIR, the folder for the class activation maps")
    try:
        import regionnet.cam  # noqa: F401
    except ImportError as e:
        raise ValueError(f"cam=true needs regionnet.cam, which cannot be imported ({e})") from e
    return Path(cfg.cam_dir).expanduser()


def save_cams(model, items, cam_dir: Path, root: Path | None) -> int:
    """Class activation maps `<cam_dir>/<layout>/<stem>_<region>.png` for (path, region,
    head) items; gradients need the model in float32 outside inference mode, on the CPU."""
    from regionnet.cam import cam_overlay, save_png

    model = model.to("cpu").float().eval()
    transform = eval_transform(model)
    saved = 0
    for path, region, head in items:
        try:
            pixels = load_image(path, int(model.hparams.image_size))
            image = transform(torch.from_numpy(pixels)[None])[None]
            with torch.enable_grad():
                overlay = cam_overlay(model, image, head, pixels)
            if path.startswith("phantom://"):
                dst = cam_dir / f"{path[len('phantom://') :].replace('/', '_')}_{region}.png"
            else:
                src = mirrored_path(path, root, cam_dir)
                dst = src.with_name(f"{Path(path).stem}_{region}.png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_png(overlay, dst)
            saved += 1
        except Exception as e:  # a failed map must not cost the predictions
            log.warning("cam: no class activation map for %s: %s", path, e)
    return saved


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
    if summary.get("study_output"):
        table.add_row(f"studies ({summary['study_output']})", str(summary["studies"]))
    console = Console()
    console.print(table)
    console.print(
        f"{summary['ok']} ok ({summary['unknown']} unknown), {summary['errors']} errors; "
        f"{summary['per_second']:.1f} radiographs/s ({summary['seconds']:.1f} s)"
    )


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


def predict(cfg: DictConfig) -> dict:
    """Predict the region of every radiograph in `cfg.input`; write `cfg.output`.

    Returns a summary: counts `ok`, `unknown`, `errors`, `regions` (radiographs per
    predicted region), `resumed`, `retried` (rows of `output` predicted again by
    `resume=retry_errors`), `seconds` and `per_second` of the predict loop, `output`.
    Raises `regionnet.writer.OutputLockedError` when another run is writing `output`.
    """
    output = Path(str(cfg.output)).expanduser()
    resume = resume_mode(cfg.get("resume"))
    with output_lock(output):
        return _predict(cfg, output, resume)


def _predict(cfg: DictConfig, output: Path, resume: bool | str) -> dict:
    group_by = cfg.get("group_by")
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}: choose null or study")
    audit = bool(cfg.get("audit")) or group_by == "study"  # the study view needs the audit
    web_cfg = cfg.get("dicomweb") or {}
    server = None
    if str(cfg.input) == "dicomweb":
        _check_dicomweb_options(cfg)
        from regionnet.dicomweb import dicomweb_inputs

        server, paths = dicomweb_inputs(web_cfg)
        root = None
    else:
        paths, root = collect_inputs(cfg.input)
    store_sr = server is not None and bool(web_cfg.get("store_sr"))
    body_part_dir = (cfg.get("dicom") or {}).get("write_body_part")
    if body_part_dir:
        body_part_dir = Path(str(body_part_dir)).expanduser().absolute()
        if root is not None and body_part_dir == root:
            raise ValueError(
                f"dicom.write_body_part={str(body_part_dir)!r} is the input folder; choose "
                "another folder (inputs are never modified)"
            )
    cam_dir = _check_cam(cfg)

    model = load_checkpoint(cfg.ckpt_path)
    regions = list(model.regions)
    override = cfg.get("threshold_override")
    if isinstance(override, DictConfig | ListConfig):
        override = OmegaConf.to_container(override, resolve=True)
    thresholds = resolve_thresholds(model.thresholds.tolist(), regions, override)
    log.info("heads %s, thresholds %s", regions, [round(t, 4) for t in thresholds])

    resumed, state = 0, ResumeState()
    if output.exists():
        if resume:
            redo = _redo(store_sr, set(paths)) if resume == RETRY_ERRORS else None
            columns = prediction_columns(regions, audit, server is not None)
            done = read_done(output, columns, redo, state)
            resumed = sum(p in done for p in paths)
            paths = [p for p in paths if p not in done]
            log.info(
                "resume: %d of %d radiographs already in %s", resumed, resumed + len(paths), output
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
        collect_cam=cam_dir is not None,
        uids=server is not None,
        sr_store=sr_store,
    )
    seconds = 0.0
    if paths:
        if cfg.get("channels_last"):
            model.hparams.channels_last = True  # forward() converts each batch
            model = model.to(memory_format=torch.channels_last)
        batch_size, collate_fn = int(cfg.batch_size), collate
        if server is not None:
            from regionnet.dicomweb import DicomWebDataset, dicomweb_collate

            dataset = DicomWebDataset(server, paths, eval_transform(model), keep_datasets=store_sr)
            batch_size = int(web_cfg.get("batch_size") or batch_size)
            collate_fn = dicomweb_collate
        else:
            dataset = RadiographDataset(
                pd.DataFrame({"path": paths}),
                regions,
                eval_transform(model),
                phantom_size=int(model.hparams.image_size),
            )
        trainer_cfg = predict_trainer_config(cfg)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=int(cfg.num_workers),
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available() and trainer_cfg["accelerator"] != "cpu",
        )
        trainer = L.Trainer(
            **trainer_cfg,
            logger=False,
            callbacks=[writer],
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=str(output.parent),
        )
        start = time.perf_counter()
        trainer.predict(model, dataloaders=loader, return_predictions=False)
        seconds = time.perf_counter() - start
    else:
        writer.write_rows([])  # an up-to-date resume still leaves a valid output file
        writer.teardown(None, None, "predict")

    if cam_dir is not None:
        n = save_cams(model, writer.cam_items, cam_dir, root)
        log.info("cam: %d class activation maps in %s", n, cam_dir)

    counts: Counter[str] = writer.counts
    per_region = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("region:")}
    done = counts["ok"] + counts["error"]
    summary = {
        "ok": counts["ok"],
        "unknown": per_region.get(UNKNOWN, 0),
        "errors": counts["error"],
        "regions": dict(sorted(per_region.items())),
        "resumed": resumed,
        "retried": state.redone,
        "body_part_written": counts["body_part_written"],
        "seconds": seconds,
        "per_second": done / seconds if seconds > 0 else 0.0,
        "output": str(output),
    }
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
