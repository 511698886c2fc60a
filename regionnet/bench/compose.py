"""The compose section (issues 17 and 18): region heads and hand landmarks as parts of one model.

Three trainings, each `regionnet-train` with the real configs under the same wall-clock budget
(`trainer.max_time`, a share of `--compose-minutes`) and the same input size, then
`regionnet-eval` of its best checkpoint on the held-out test patients:

  regions    task=regions: the five region heads on ../shared/data's radiographs
  multi      task=multi: both in one model, one backbone pass per film: the same region films
             and split (data.landmarks.dataset=hand_dha; the radiographs' PNG copies of the
             hands are joined with the landmark films, `join_same_films`: each hand once, in
             its patient's region split), one checkpoint
  landmarks  task=landmarks data.dataset=hand_dha: the 37 hand landmarks alone (step 1), on
             the composed run's split of the hands (data.split_file)
  multi_repeat4  task=multi with data.landmark_repeat=4: each training hand 4 times an epoch
  regions_seed1  task=regions with seed 1 on the same split: how far two region runs differ
             by training randomness alone, the yardstick for the with/without-part difference

Figures: the region heads with and without the landmark part (paired patient bootstrap on the
region test films both runs tested), the hand landmark errors of the composed model beside
those of the landmark model alone (the same test hands), the time per film of the composed
model against the two separate ones run one after the other (`regionnet.load_model(ckpt).
predict` over the same films), and the network-only cost of the parts.

Runs live in `<out>/artifacts/compose/<run>/` (git-ignored); their `checkpoints/best.ckpt`
load with `regionnet.load_model`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from regionnet.bench.findings import (
    REGION_BATCH,
    held_out_paths,
    paired_region_delta,
    predict_times,
    region_figures,
    train_and_evaluate,
)
from regionnet.bench.keys import flat_keys as numbered_keys
from regionnet.bench.protocol import protocol_overrides
from regionnet.bench.settings import QUICK_SIZE, BenchSettings, FineTune, log
from regionnet.bench.timeline import max_time
from regionnet.config import compose_config

#: run -> task, its share of --compose-minutes, its validation figures (the first is the
#: checkpoint's monitor) and overrides of its own
RUNS = {
    "regions": {"task": "regions", "share": 0.25, "monitors": ("val/auroc_mean", "val/top1_acc")},
    "multi": {
        "task": "multi",
        "share": 0.25,
        "monitors": ("val/auroc_mean", "val/top1_acc", "val/landmarks/mre_pct"),
    },
    # the same with each hand film 4 times per epoch (data.landmark_repeat): the part sees
    # 4 x 80 hands an epoch instead of 80 among ~1,330 films
    "multi_repeat4": {
        "task": "multi",
        "share": 0.25,
        "monitors": ("val/auroc_mean", "val/top1_acc", "val/landmarks/mre_pct"),
        "extra": ["data.landmark_repeat=4"],
    },
    # after multi: it trains on the composed run's split of the hands (`landmark_split`)
    "landmarks": {"task": "landmarks", "share": 0.25, "monitors": ("val/mre_pct",)},
    # training randomness alone: task=regions again with another seed on the same split, the
    # yardstick for the with/without-part difference
    "regions_seed1": {
        "task": "regions",
        "share": 0.25,
        "monitors": ("val/auroc_mean", "val/top1_acc"),
        "extra": ["seed=1", "data.split_seed=42"],  # 42: conf/train.yaml's seed, the split
    },
}
#: one input size for every run (the findings section's region size)
IMAGE_SIZE = 128
#: epochs of each run's cosine schedule; trainer.max_time stops earlier. The landmark run has
#: 76 training hands per epoch, the others ~1,330 films: it gets more epochs (and stops early
#: after 10 without a better val/mre_pct). On an idle 2-core machine a 6-epoch region run takes
#: about 2.5 min at 128 px
EPOCHS = {"regions": 6, "multi": 6, "multi_repeat4": 6, "landmarks": 60, "regions_seed1": 6}
LANDMARK_BATCH = 8
LANDMARK_SET = "hand_dha"
#: --quick: hand films (the manifest's first), batches per epoch
QUICK_FILMS = 24
QUICK_BATCHES = 2
RESAMPLES = 1000
#: the landmark figures reported, as `regionnet-eval` names them
LANDMARK_FIGURES = ("mre_pct", "mre_px", "pck@2", "pck@5", "films")


def run_minutes(settings: BenchSettings, run: str) -> float:
    return settings.compose_minutes * RUNS[run]["share"]


def run_overrides(settings: BenchSettings, run: str, run_dir: Path) -> list[str]:
    """regionnet-train overrides of one run (`RUNS`)."""
    size = QUICK_SIZE if settings.quick else IMAGE_SIZE
    epochs = 1 if settings.quick else EPOCHS[run]
    budget = [
        f"trainer.max_epochs={epochs}",
        f"trainer.max_time={max_time(run_minutes(settings, run))}",
        "trainer.accelerator=cpu",
        f"paths.output_dir={run_dir}",
        "test=false",  # regionnet-eval tests the best checkpoint
    ]
    quick = [f"trainer.limit_train_batches={QUICK_BATCHES}",
             f"trainer.limit_val_batches={QUICK_BATCHES}"] if settings.quick else []  # fmt: skip
    task = RUNS[run]["task"]
    budget += RUNS[run].get("extra", [])
    if task == "landmarks":
        return [
            "task=landmarks",
            f"data.split_file={landmark_split_file(settings)}",
            f"paths.data_dir={settings.data_dir}",
            f"data.dataset={LANDMARK_SET}",
            f"data.image_size={size}",
            f"data.batch_size={LANDMARK_BATCH}",
            f"data.num_workers={settings.num_workers}",
            f"trainer.precision={settings.precision}",
            "logger=csv",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            *([f"data.limit={QUICK_FILMS}"] if settings.quick else []),
            *budget,
            *quick,
        ]
    base = protocol_overrides(settings, FineTune(size, epochs, None))
    base = [o for o in base if not o.startswith(("trainer.max_epochs=", "test=", "trainer.limit"))]
    if task == "regions":
        return ["task=regions", *base, f"data.batch_size={REGION_BATCH}", *budget, *quick]
    # task=multi: the region data's own keys move under data.regions (data=shared is its
    # default there); image size, loader settings and batch are the combined module's
    multi = ["task=multi", f"data.landmarks.dataset={LANDMARK_SET}", "data.landmark_region=hand"]
    for o in base:
        key = o.split("=", 1)[0]
        if o == "data=shared":
            continue
        if key == "data.csv":
            o = f"data.regions.csv={o.split('=', 1)[1]}"
        multi.append(o)
    if settings.quick:
        multi.append(f"data.landmarks.limit={QUICK_FILMS}")
    return [*multi, f"data.batch_size={REGION_BATCH}", *budget, *quick]


def landmark_split_file(settings: BenchSettings) -> Path:
    """The hands' split of the composed run (its split.csv's landmark films, paths relative
    to the landmark folder), for the landmark run: the same training and test hands."""
    return settings.artifacts / "compose" / "landmark_split.csv"


def write_landmark_split(settings: BenchSettings, multi_dir: Path) -> Path:
    split = pd.read_csv(multi_dir / "split.csv", dtype=str, keep_default_na=False)
    hands = split[split["kind"] == "landmarks"].copy()
    root = settings.data_dir / "landmarks"
    hands["path"] = [str(Path(p).relative_to(root)) for p in hands["path"]]
    out = landmark_split_file(settings)
    hands[["path", "patient_id", "split"]].to_csv(out, index=False)
    return out


def paired_predictions(multi_dir: Path) -> Path:
    """The composed run's test predictions with each joined landmark film under its region
    manifest path (`same_film`), so the pairing with task=regions finds it."""
    table = pd.read_csv(multi_dir / "eval" / "predictions.csv", keep_default_na=False)
    if "same_film" in table:
        table["path"] = table["same_film"].where(table["same_film"] != "", table["path"])
    out = multi_dir / "eval" / "predictions_paired.csv"
    table.to_csv(out, index=False)
    return out


def landmark_figures(result: dict, prefix: str) -> dict:
    """The test landmark errors of an evaluation (`prefix`: `test` for a landmark model,
    `test/landmarks` for the composed one): each figure and its 95 % interval."""
    out = {}
    for name in LANDMARK_FIGURES:
        out[name] = result.get(f"{prefix}/{name}")
        if name != "films":
            out[f"{name}_ci"] = result.get(f"{prefix}/{name}_ci")
    return out


def parts_cost(ckpt: Path, image_size: int, batch: int = 16, repeats: int = 10) -> dict:
    """Network-only milliseconds per film of the composed model at its input size: the
    backbone and region heads alone (`net.all_logits`) vs the whole one pass with the parts
    (`forward_all`), alternated, best of `repeats`."""
    from regionnet.compose.infer import load_multi_model

    model = load_multi_model(ckpt).eval()
    x = torch.randn(batch, 1, image_size, image_size)
    calls = {"regions": model.net.all_logits, "with_parts": model.forward_all}
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    regions_ms, parts_ms = (1000 * min(times[k]) / batch for k in calls)
    return {
        "batch": batch,
        "image_size": image_size,
        "network_ms_per_film_region_heads": regions_ms,
        "network_ms_per_film_with_parts": parts_ms,
        "parts_extra_ms_per_film": parts_ms - regions_ms,
        "parts_params": sum(p.numel() for p in model.parts.parameters()),
    }


def compose_section(settings: BenchSettings) -> dict:
    """Train, evaluate and time the three runs (module docstring); the results dict."""
    root = settings.artifacts / "compose"
    start = time.perf_counter()
    res: dict = {
        "settings": {
            "backbone": compose_config("train", []).model.backbone,
            "pretrained": "ImageNet (installed package, no download)",
            "image_size": QUICK_SIZE if settings.quick else IMAGE_SIZE,
            "landmark_set": LANDMARK_SET,
            "precision": settings.precision,
            "budget_minutes": settings.compose_minutes,
            "torch_threads": torch.get_num_threads(),
            "num_workers": settings.num_workers,
            "load_average_at_start": os.getloadavg()[0],
        },
        "runs": {},
    }
    if (
        not settings.manifest_csv.is_file()
        or not (settings.data_dir / "landmarks" / "manifest.csv").is_file()
    ):
        return {"skipped": f"no radiographs and landmarks under {settings.data_dir}"}
    results: dict[str, dict] = {}
    for run, spec in RUNS.items():
        run_dir = root / run
        values = train_and_evaluate(
            settings, "compose", run, run_dir, run_overrides(settings, run, run_dir),
            spec["monitors"], spec["task"], run_minutes(settings, run),
            1 if settings.quick else EPOCHS[run], "min" if spec["task"] == "landmarks" else "max",
        )  # fmt: skip
        results[run] = values.pop("_result")
        res["runs"][run] = values
        if run == "multi":
            write_landmark_split(settings, run_dir)
    runs = res["runs"]
    regions_dir, multi_dir = Path(runs["regions"]["run_dir"]), Path(runs["multi"]["run_dir"])
    regions = list(results["regions"]["regions"])
    resamples = 50 if settings.quick else RESAMPLES
    repeat_dir = Path(runs["multi_repeat4"]["run_dir"])
    res["region_accuracy"] = {
        "without_parts": region_figures(results["regions"]),
        "with_parts": region_figures(results["multi"]),
        "paired": paired_region_delta(
            paired_predictions(multi_dir),
            regions_dir / "eval" / "predictions.csv",
            regions,
            resamples,
        ),
        "with_parts_repeat4": region_figures(results["multi_repeat4"]),
        "paired_repeat4": paired_region_delta(
            paired_predictions(repeat_dir),
            regions_dir / "eval" / "predictions.csv",
            regions,
            resamples,
        ),
        # the same comparison between two task=regions runs that differ in their seed only
        "seed_spread": paired_region_delta(
            Path(runs["regions_seed1"]["run_dir"]) / "eval" / "predictions.csv",
            regions_dir / "eval" / "predictions.csv",
            regions,
            resamples,
        ),
    }
    res["hand_landmarks"] = {
        "alone": landmark_figures(results["landmarks"], "test"),
        "composed": landmark_figures(results["multi"], "test/landmarks"),
        "composed_repeat4": landmark_figures(results["multi_repeat4"], "test/landmarks"),
        "same_test_hands": _same_hands(Path(runs["landmarks"]["run_dir"]), multi_dir, settings),
    }
    region_films = held_out_paths(regions_dir)
    hands = held_out_paths(Path(runs["landmarks"]["run_dir"]), settings.data_dir / "landmarks")
    if settings.quick:
        region_films, hands = region_films[:8], hands[:4]
    films = region_films + hands
    log(f"compose: predict time per film, {len(films)} test films (regions + hands)")
    ckpts = {r: Path(runs[r]["checkpoint"]) for r in ("regions", "landmarks", "multi")}
    p = res["predict"] = predict_times(ckpts, films, repeats=1 if settings.quick else 2)
    p["separate_ms_per_film"] = p["regions"]["ms_per_film"] + p["landmarks"]["ms_per_film"]
    p["composed_over_separate"] = p["multi"]["ms_per_film"] / p["separate_ms_per_film"]
    p["network"] = parts_cost(ckpts["multi"], res["settings"]["image_size"])
    res["settings"]["load_average_at_end"] = os.getloadavg()[0]
    res["wall_seconds"] = round(time.perf_counter() - start, 1)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    (settings.artifacts / "compose.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def _same_hands(landmark_dir: Path, multi_dir: Path, settings: BenchSettings) -> bool:
    """Whether the landmark run and the composed run tested the same hand films."""
    root = settings.data_dir / "landmarks"
    alone = set(held_out_paths(landmark_dir, root))
    split = pd.read_csv(multi_dir / "split.csv", dtype=str, keep_default_na=False)
    hands = split[(split["kind"] == "landmarks") & (split["split"] == "test")]
    return alone == set(hands["path"])


def flat_keys(res: dict, prefix: str = "compose") -> dict[str, object]:
    """The section's figures under dotted names, e.g.
    `compose.region_accuracy.paired.delta_test_auroc_mean`, `compose.hand_landmarks.composed.
    mre_pct`, `compose.predict.composed_over_separate` (lists and texts left out)."""
    return numbered_keys(res, prefix)


# -- RESULTS.md ----------------------------------------------------------------------------------
def compose_markdown(cd: dict) -> list[str]:
    """The "Composed model" section of RESULTS.md."""
    from regionnet.bench.findings import _ci_text as _ci
    from regionnet.bench.findings import _run_line, _v

    lines = ["## Composed model (issues 17, 18): region heads + hand landmarks, one backbone", ""]
    if "skipped" in cd:
        return lines + [f"Skipped: {cd['skipped']}.", ""]
    s = cd["settings"]
    lines += [
        f"`regionnet-train` with {s['backbone']} ({s['pretrained']}) at {s['image_size']} px, "
        f"{s['precision']}, each run at most a "
        f"{s['budget_minutes'] * RUNS['multi']['share']:.1f}-minute "
        f"CPU budget (`trainer.max_time`); `task=multi` holds the five region heads and the "
        f"{s['landmark_set']} landmark part in one checkpoint, one backbone pass per film. "
        "Then `regionnet-eval` of each best checkpoint on the held-out test patients; 95 % "
        f"intervals bootstrap whole patients. Section wall time {cd['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    lines += [_run_line(name, r) for name, r in cd["runs"].items()] + [""]
    ra = cd["region_accuracy"]
    wo, wi, pd_ = ra["without_parts"], ra["with_parts"], ra["paired"]
    wr, pr = ra["with_parts_repeat4"], ra["paired_repeat4"]
    lines += [
        "### Region heads with and without the landmark part (same region films and split)",
        "",
        "| figure | task=regions | task=multi | multi - regions [95 % CI, paired] | "
        "task=multi, landmark_repeat=4 | its - regions [95 % CI, paired] |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, key, delta in (
        ("test AUROC mean", "test_auroc_mean", "delta_test_auroc_mean"),
        ("test top-1 accuracy", "test_top1_acc", "delta_test_top1_acc"),
        ("test AUROC min", "test_auroc_min", None),
        ("`other` called unknown", "test_unknown_rate_other", None),
    ):
        d = f"{_v(pd_.get(delta))}{_ci(pd_.get(f'{delta}_ci'))}" if delta else ""
        dr = f"{_v(pr.get(delta))}{_ci(pr.get(f'{delta}_ci'))}" if delta else ""
        lines.append(f"| {label} | {_v(wo[key])} | {_v(wi[key])} | {d} | {_v(wr[key])} | {dr} |")
    for r in wo["per_region"]:
        a = wo["per_region"][r]["test_auroc"]
        b = wi["per_region"].get(r, {}).get("test_auroc")
        c = wr["per_region"].get(r, {}).get("test_auroc")
        lines.append(f"| AUROC {r} | {_v(a)} | {_v(b)} | | {_v(c)} | |")
    sp = ra["seed_spread"]
    lines += [
        "",
        "Training randomness alone, the yardstick: two `task=regions` runs differing only in "
        "their seed (1 and 42, the same split) differ by "
        f"{_v(sp.get('delta_test_auroc_mean'))}{_ci(sp.get('delta_test_auroc_mean_ci'))} in "
        f"test AUROC mean and {_v(sp.get('delta_test_top1_acc'))}"
        f"{_ci(sp.get('delta_test_top1_acc_ci'))} in top-1 accuracy (seed 1 - seed 42). The "
        "paired intervals resample test patients only, not training runs.",
        "",
        f"Paired on the {pd_.get('paired_films')} test films both runs tested (a hand film "
        "both data sets hold is one film in the composed run, paired through its copy in the "
        "region manifest).",
        "",
        "### Hand landmarks alone and as a part (same test hands)",
        "",
        "| figure | task=landmarks | task=multi | task=multi, landmark_repeat=4 |",
        "| --- | ---: | ---: | ---: |",
    ]
    hl = cd["hand_landmarks"]
    kinds = ("alone", "composed", "composed_repeat4")
    for name, label in (("mre_pct", "MRE, % of hand width"), ("mre_px", "MRE, px"),
                        ("pck@2", "PCK@2 (share within 2 %)"),
                        ("pck@5", "PCK@5 (share within 5 %)")):  # fmt: skip
        cells = [f"{_v(hl[k][name])}{_ci(hl[k].get(f'{name}_ci'))}" for k in kinds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    films = [int(hl[k]["films"]) if hl[k].get("films") else 0 for k in ("alone", "composed")]
    lines += [
        "",
        f"Test hands: {films[0]} alone, {films[1]} composed; same films: "
        f"{hl['same_test_hands']}. One step (no refiner) in both.",
        "",
        "### Time per film: one composed model vs the two models it replaces",
        "",
    ]
    p = cd["predict"]
    n = p["network"]
    lines += [
        f"`regionnet.load_model(ckpt).predict(paths)` over {p['multi']['films']} test films "
        f"(region films and hands; best of the passes, {p['torch_threads']} torch threads): "
        f"task=regions {p['regions']['ms_per_film']:.1f} ms/film, task=landmarks "
        f"{p['landmarks']['ms_per_film']:.1f} ms/film, both one after the other "
        f"{p['separate_ms_per_film']:.1f} ms/film; task=multi {p['multi']['ms_per_film']:.1f} "
        f"ms/film ({p['composed_over_separate']:.2f} x the two). Network only at "
        f"{n['image_size']} px (batch {n['batch']}): backbone + region heads "
        f"{n['network_ms_per_film_region_heads']:.2f} ms/film, + the landmark part "
        f"{n['network_ms_per_film_with_parts']:.2f} ms/film ({n['parts_params'] / 1e6:.2f} M "
        "parameters in the part).",
        "",
    ]
    return lines
