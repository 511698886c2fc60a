"""regionnet.bench and its command line, scripts/benchmark.py: settings, timing, and a
`--quick` smoke test that every section runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from regionnet.bench import BenchSettings, FineTune
from regionnet.bench.protocol import QUICK_FULLRES, protocol_overrides, quick_data
from regionnet.bench.speed import images_per_second

ROOT = Path(__file__).resolve().parents[1]


def test_settings_travel_in_one_object(tmp_path):
    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true", skip=frozenset({"ssl"}))
    assert not s.runs("ssl") and s.runs("transfer") and s.artifacts == tmp_path / "out/artifacts"
    q = s.quick_sized()
    assert q.quick and q.accuracy == FineTune(32, 1, 1) and q.transfer == FineTune(32, 1, 1)
    assert (q.pretrain_size, q.pretrain_epochs, q.backbone_size) == (32, 1, 32)
    # None leaves the value to the experiment config
    full = protocol_overrides(s, s.transfer)
    assert not any(o.startswith(("data.image_size=", "data.csv=", "test=")) for o in full)
    overrides = protocol_overrides(q, q.accuracy)
    assert {"data.image_size=32", "trainer.max_epochs=1", "trainer.precision=32-true"} <= set(
        overrides
    )
    # quick: the small manifest, a few batches, no test after fitting (evaluate tests)
    assert f"data.csv={q.quick_manifest}" in overrides and "test=false" in overrides
    assert "trainer.limit_train_batches=4" in overrides


def test_quick_data_keeps_a_few_patients_per_source_and_region(tmp_path):
    data = tmp_path / "data"
    (data / "radiographs").mkdir(parents=True)
    rows = [
        {"path": f"{src}/{region}/{pid}_{k}.png", "region": region, "source": src,
         "patient_id": f"{src}-{region}-{pid}"}
        for src, region in (("a", "knee"), ("a", "hand"), ("b", "hand"))
        for pid in range(8)
        for k in range(2)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(data / "radiographs" / "manifest.csv", index=False)
    s = BenchSettings(data, tmp_path / "out", "32-true").quick_sized()
    manifest, external = quick_data(s, patients=3)
    assert manifest == s.quick_manifest and external is None  # no external/ folder here
    df = pd.read_csv(manifest)
    assert df.groupby(["source", "region"])["patient_id"].nunique().tolist() == [3, 3, 3]
    assert len(df) == 3 * 3 * 2  # every film of a kept patient
    assert all(Path(p).is_absolute() for p in df["path"])
    assert quick_data(s, patients=3)[0].read_text() == manifest.read_text()  # seeded


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 5, 3)

    def logits(self, x):
        return self.conv(self.stem(x)).mean((2, 3))


def test_images_per_second_times_inference_with_torch_timer():
    model = _Tiny()
    rate = images_per_second(model, 4, 32, channels_last=True, min_run_time=0.05)
    assert rate > 0
    assert model.conv.weight.is_contiguous()  # the layout is restored


@pytest.mark.shared_data
@pytest.mark.slow
def test_quick_benchmark_writes_every_section(shared_data, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "scripts/benchmark.py", "--quick", "--out", str(out),
           "--data-dir", str(shared_data)]  # fmt: skip
    # about 1.5 min on 2 quiet CPU cores; the timeout only guards against a hang
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    # the checkpoints this run trained are named at the end, and exist
    logged = res.stdout[res.stdout.index("checkpoints trained in this run") :]
    for name in ("yi2019", "ssl_base", "transfer/imagenet_recipe", "transfer/hand_rsna_to_dha"):
        assert str(out / "artifacts" / name / "checkpoints" / "best.ckpt") in logged
    text = (out / "results.json").read_text()
    # results.json names paths as RESULTS.md does; <out>/... is this run's output folder
    assert str(out) not in text and str(shared_data.resolve()) not in text
    results = json.loads(text.replace('"<out>/', f'"{out}/'))
    assert {"machine", "accuracy", "speed", "scaling", "backbones", "ssl", "transfer"} <= set(
        results
    )
    acc = results["accuracy"]["yi2019"]
    assert Path(acc["checkpoint"]).is_file()
    assert set(acc["breakdown"]["within_fracture_source"]) == {"shoulder", "elbow"}
    # quick: the first files of each full-resolution folder (hand, chest)
    assert acc["fullres"]["images"] == 2 * QUICK_FULLRES
    assert set(acc["fullres"]["accuracy_by_anatomy"]) == {"hand", "chest"}
    # quick: every fine-tune on the small manifest (named relative to the output folder)
    assert "data.csv=<out>/artifacts/quick/quick_manifest.csv" in acc["overrides"]
    speed = results["speed"]
    assert speed["shared_vs_separate"]["ratio"] > 1.5  # five backbones cost more than one
    assert speed["predict"]["files"] > 0 and speed["predict"]["end_to_end_per_s"] > 0
    assert speed["training"]["lightning_vs_plain_ratio"] > 0  # regionnet.bench.overhead
    assert "gpu" in speed  # measured with CUDA, a note without
    assert len(results["backbones"]["rows"]) == 2
    ssl = results["ssl"]
    assert Path(ssl["pretrain"]["weights_file"]).is_file() and ssl["pretrain"]["pretrain/steps"] > 0
    for row in ("base", "ssl", "ssl_recipe"):
        assert 0 <= ssl[row]["operating_point"]["in_set_sensitivity"] <= 1
        assert set(ssl[row]["breakdown"]["within_fracture_source"]) == {"shoulder", "elbow"}
    assert "weights_file" not in " ".join(ssl["base"]["overrides"])
    assert "model.pretrained=true" in ssl["base"]["overrides"]  # SSL continues from ImageNet
    assert "experiment=recipe" in ssl["ssl_recipe"]["overrides"]
    tr = results["transfer"]
    assert "model.pretrained=false" in tr["rows"]["scratch"]["overrides"]
    assert "experiment=recipe" in tr["rows"]["imagenet_recipe"]["overrides"]
    for row in ("imagenet", "imagenet_recipe"):  # one split for every row
        assert any(o.startswith("data.split_file=") for o in tr["rows"][row]["overrides"])
        assert Path(tr["rows"][row]["checkpoint"]).is_file()
    assert tr["rows"]["imagenet"]["external"]["images"] > 0
    assert set(tr["hand_across_sources"]) == {"hand_rsna_to_dha"}  # quick: one way
    for h in tr["hand_across_sources"].values():  # test hands come from the other source only
        assert {k for k in h["hands"] if k.endswith("/test")} == {f"{h['test_source']}/test"}
    assert tr["cam_errors"] and all(c["bytes"] < 100_000 for c in tr["cam_errors"])
    cp = results["compose"]  # region heads + hand landmarks as one model, and each alone
    assert set(cp["runs"]) == {"regions", "landmarks", "multi", "multi_repeat4", "regions_seed1"}
    assert "data.landmark_repeat=4" in cp["runs"]["multi_repeat4"]["overrides"]
    assert "seed=1" in cp["runs"]["regions_seed1"]["overrides"]
    assert "task=multi" in cp["runs"]["multi"]["overrides"]
    assert cp["region_accuracy"]["paired"]["paired_films"] > 0
    assert cp["hand_landmarks"]["same_test_hands"]
    assert cp["hand_landmarks"]["composed"]["films"] == cp["hand_landmarks"]["alone"]["films"]
    assert cp["predict"]["multi"]["errors"] == 0 and cp["predict"]["composed_over_separate"] > 0
    assert cp["predict"]["network"]["parts_params"] > 0
    report = (out / "RESULTS.md").read_text()
    for heading in (
        "## Accuracy on real radiographs",
        "## Speed",
        "## Cost curves",
        "## Backbones",
        "## Self-supervised pretraining and the stronger recipe",
        "## Transfer learning",
        "## Composed model",
    ):
        assert heading in report
    # committed reports name paths relative to the repository, data or output folder
    assert str(out) not in report and str(shared_data.resolve()) not in report
    assert (out / "scaling.png").stat().st_size > 1000


@pytest.mark.shared_data
@pytest.mark.slow
def test_overhead_trains_the_same_model_both_ways(shared_data, tmp_path):
    """regionnet-train and the plain loop see the same batches of the same model: one pair at
    the quick sizes, its ratios and breakdowns."""
    from regionnet.bench.overhead import overhead_section

    settings = BenchSettings(shared_data, tmp_path / "out", "32-true").quick_sized()
    quick_data(settings)
    res = overhead_section(settings)
    assert res["lightning_s"] > 0 and res["plain_s"] > 0 and res["lightning_vs_plain_ratio"] > 0
    lt, pl = res["breakdown"]["lightning"], res["breakdown"]["plain"]
    assert lt["train_batches"] == pl["train_batches"] > 0  # limit_train_batches on both sides
    assert lt["training_step_s"] > 0 and lt["backward_s"] > 0 and pl["forward_s"] > 0
    assert "ModelCheckpoint" in lt["callbacks_s"]
    assert 0 <= res["val_auroc_mean"]["plain"] <= 1


#: the landmarks section's settings block, as its report reads it
LANDMARK_SETTINGS = {"image_size": 256, "backbone": "resnet18", "pretrained": "ImageNet",
                     "stride": 8, "head_width": 128, "batch_size": 8, "optimizer": "AdamW",
                     "precision": "32-true", "budget_minutes": 20, "torch_threads": 2}  # fmt: skip


def test_landmark_section_names_its_figures_for_what_they_are(tmp_path):
    """The landmarks section (regionnet.bench.landmarks) on a fake evaluation: results keys
    such as landmarks.spine.two_step.test.cobb_smape, the training overrides and the report,
    without training anything."""
    from regionnet.bench.landmarks import (
        flat_keys,
        landmarks_markdown,
        max_time,
        row_overrides,
        targets,
        test_figures,
    )

    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true")
    run = tmp_path / "run"
    over = row_overrides(s, ("spine", "two_step"), run)
    assert {"task=landmarks", "data.dataset=spine_aasce", "model.refine=true"} <= set(over)
    assert f"paths.output_dir={run}" in over and "test=false" in over
    assert max_time(0.45 * 20) == "00:00:09:00" and max_time(90) == "00:01:30:00"

    evaluated = {"test/err_x_median_pct": 1.5, "test/err_x_median_pct_ci": [1.2, 1.9],
                 "test/cobb_mae/pt": 4.0, "test/cobb_smape": 25.0, "test/pck@2": 0.4,
                 "test/films": 72.0, "test/step1/cobb_smape": 30.0}  # fmt: skip
    fig = test_figures(evaluated)
    assert fig["err_x_median_pct_ci"] == [1.2, 1.9] and fig["cobb_mae_pt_deg"] == 4.0
    assert fig["films"] == 72 and fig["pck_2pct"] == 0.4 and "cobb_smape_ci" not in fig
    row = {"test": fig, "test_step1": test_figures(evaluated, "test/step1"), "epochs": 3,
           "max_epochs": 4, "train_seconds": 500.0, "budget_minutes": 9.0,
           "val_mre_pct_best": 10.0, "checkpoint": "best.ckpt",
           "predict_films_per_s": 2.5}  # fmt: skip
    res = {"settings": {**LANDMARK_SETTINGS, "backbone": "tf_efficientnet_lite0"},
           "spine": {"two_step": row}, "hand": {"two_step": {"skipped": "budget"}},
           "wall_seconds": 600.0}  # fmt: skip
    res["targets"] = targets(res)
    keys = flat_keys(res)
    assert keys["landmarks.spine.two_step.test.cobb_smape"] == 25.0
    assert keys["landmarks.spine.two_step.test_step1.cobb_smape"] == 30.0
    assert keys["landmarks.spine.two_step.predict_films_per_s"] == 2.5
    met = {t["key"]: t["met"] for t in res["targets"]}
    assert met == {"spine.two_step.test.err_x_median_pct": True,
                   "spine.two_step.test.cobb_smape": False}  # fmt: skip
    text = "\n".join(landmarks_markdown(res))
    assert "## Landmarks (issue 17)" in text and "25.0" in text and "budget" in text


def test_landmark_rows_can_rerun_alone_and_keep_the_others(tmp_path):
    """--landmarks-rows hand.two_step trains that row only; the other rows come from the
    existing results.json, marked as from an earlier run, and the hand table shows both."""
    import json
    from dataclasses import replace

    from regionnet.bench.landmarks import (
        landmarks_markdown,
        previous_rows,
        rows,
        start_checkpoint,
    )

    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true")
    order = rows(s)  # a two-step row after the step-1 row it starts from, the detector's after it
    assert order.index(("hand", "two_step")) > order.index(("hand", "step1"))
    assert order.index(("spine", "detector_crops")) > order.index(("spine", "two_step"))
    one = replace(s, landmarks_rows=("hand.two_step",))
    assert rows(one) == [("hand", "two_step")]
    with pytest.raises(ValueError, match="hand.three_step"):
        rows(replace(s, landmarks_rows=("hand.three_step",)))
    assert previous_rows(s) == {}  # a full run keeps nothing
    run = {"epochs": 15, "max_epochs": 15, "train_seconds": 60.0, "budget_minutes": 5.0,
           "val_mre_pct_best": 4.0, "checkpoint": "best.ckpt"}  # fmt: skip
    step1 = {"test": {"mre_pct": 4.4, "films": 16}, **run}
    old = {"landmarks": {"hand": {"step1": step1, "two_step": {"skipped": "budget"}},
                         "data": {"hand": {"films": 109}}}}  # fmt: skip
    one.out_dir.mkdir(parents=True)
    (one.out_dir / "results.json").write_text(json.dumps(old))
    kept = previous_rows(one)
    assert kept["hand"] == {"step1": {**step1, "from_earlier_run": True}}  # skipped rows go
    assert kept["data"] == {"hand": {"films": 109}}
    two = {"test": {"mre_pct": 3.1, "films": 16}, "test_step1": {"mre_pct": 4.0}, **run}
    res = {"settings": LANDMARK_SETTINGS,
           "hand": {**kept["hand"], "two_step": two}, "wall_seconds": 60.0}  # fmt: skip
    text = "\n".join(landmarks_markdown(res))
    assert "| step 1 | 2-step: its step 1 | 2-step: final |" in text
    assert "| 4.40 | 4.00 | 3.10 |" in text
    assert "- Hands: more epochs and resolution mostly" in text  # no targets given: not met
    res["targets"] = [{"key": "hand.two_step.test.mre_pct", "value": 1.0, "ci": None,
                       "target": "≤ 2", "published": None, "met": True}]  # fmt: skip
    assert "target is met by the two_step row" in "\n".join(landmarks_markdown(res))
    assert text.count("kept from an earlier run") == 2  # hand step1's line, the wall time
    # a two-step row trained alone starts from ImageNet: the kept step-1 file is elsewhere
    assert start_checkpoint(res, ("hand", "two_step")) is None
    best = tmp_path / "best.ckpt"
    best.write_bytes(b"")
    fresh = {"hand": {"step1": {"checkpoint": str(best)}}}
    assert start_checkpoint(fresh, ("hand", "two_step")) == best
    assert start_checkpoint(fresh, ("hand", "step1")) is None


def test_the_detector_crops_row_needs_both_checkpoints_and_one_split(tmp_path):
    """spine.detector_crops trains nothing: it evaluates spine.two_step's checkpoint with the
    findings section's box checkpoint, skipped with the reason where either is missing or
    the two runs split the patients differently; measured, the table and levers show it."""
    from regionnet.bench.landmarks import detector_row, landmarks_markdown

    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true")
    row, root = ("spine", "detector_crops"), tmp_path / "runs"
    ckpt = tmp_path / "two_step" / "checkpoints" / "best.ckpt"
    res = {"spine": {"two_step": {"checkpoint": str(ckpt)}}}
    assert (
        "run both, then `--landmarks-rows spine.detector_crops`"
        in (detector_row(s, res, row, root)["skipped"])
    )
    boxes = s.artifacts / "findings" / "boxes"
    for d in (ckpt.parent, boxes / "checkpoints"):
        d.mkdir(parents=True)
        (d / "best.ckpt").write_bytes(b"")
    split = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "split": ["train", "test"]})
    split.to_csv(ckpt.parent.parent / "split.csv", index=False)
    split.assign(split=["test", "train"]).to_csv(boxes / "split.csv", index=False)
    assert "split the films differently" in detector_row(s, res, row, root)["skipped"]

    run = {"max_epochs": 6, "epochs": 6, "train_seconds": 60.0, "budget_minutes": 9.0,
           "val_mre_pct_best": 40.0, "checkpoint": "best.ckpt"}  # fmt: skip
    two = {"test": {"off_level_pct": 35.0, "err_y_median_pct": 18.4, "cobb_smape": 13.2,
                    "films": 72}, "test_step1": {}, **run}  # fmt: skip
    det = {"test": {"off_level_pct": 45.0, "err_y_median_pct": 31.6, "cobb_smape": 14.3},
           "eval_of": "two_step", "checkpoint": "best.ckpt", "detector": "boxes.ckpt",
           "eval_seconds": 50.0}  # fmt: skip
    res = {"settings": LANDMARK_SETTINGS,
           "spine": {"two_step": two, "detector_crops": det}, "wall_seconds": 60.0}  # fmt: skip
    text = "\n".join(landmarks_markdown(res))
    assert "| 2-step, crops from the vertebra detector |" in text
    assert "| n/a | n/a | 35.0 | 45.0 |" in text  # the off-level row
    assert "45 % of vertebrae on another level against 35 % with step 1's crops" in text
    assert "evaluated with `refine_detector=boxes.ckpt`" in text


def test_committed_results_md_is_what_the_report_makes_of_results_json(tmp_path):
    """benchmarks/RESULTS.md is regenerated from benchmarks/results.json by the report code
    (`--render-only`), so every committed number comes from the committed results and the
    wording is the current code's: a stale RESULTS.md fails here."""
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_bytes((ROOT / "benchmarks" / "results.json").read_bytes())
    cmd = [sys.executable, "scripts/benchmark.py", "--render-only", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rendered = (out / "RESULTS.md").read_text()
    assert rendered == (ROOT / "benchmarks" / "RESULTS.md").read_text()


def test_spine_step1_at_twice_the_size_is_optional_and_reported_beside_step1(tmp_path):
    """spine.step1_2x trains only when named (--landmarks-rows), at twice the input size;
    the spine table gains its column and the levers name both off-level shares."""
    from dataclasses import replace

    from regionnet.bench.landmarks import landmarks_markdown, row_overrides, rows

    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true")
    assert ("spine", "step1_2x") not in rows(s)
    named = replace(s, landmarks_rows=("spine.step1_2x",))
    assert rows(named) == [("spine", "step1_2x")]
    over = row_overrides(named, ("spine", "step1_2x"), tmp_path / "run")
    assert f"data.image_size={2 * s.landmarks_image_size}" in over
    run = {"max_epochs": 5, "train_seconds": 60.0, "budget_minutes": 10.0,
           "val_mre_pct_best": 40.0, "checkpoint": "best.ckpt"}  # fmt: skip
    one = {"test": {"off_level_pct": 49.0, "err_y_median_pct": 31.9, "films": 72},
           "image_size": 256, "epochs": 11, **run}  # fmt: skip
    big = {"test": {"off_level_pct": 20.0, "err_y_median_pct": 12.0, "films": 72},
           "image_size": 512, "epochs": 5, **run}  # fmt: skip
    res = {"settings": LANDMARK_SETTINGS,
           "spine": {"step1": one, "step1_2x": big}, "wall_seconds": 60.0}  # fmt: skip
    text = "\n".join(landmarks_markdown(res))
    assert "| step 1 alone at 512 px |" in text
    assert "| 49.0 | n/a | n/a | 20.0 |" in text  # the off-level row, one cell per column
    assert "places 49 % of the test vertebrae nearer another vertebra" in text
    assert "512 px (5 epochs): 20 % on another level" in text
    assert "Twice the resolution cut that share by 29 points" in text
