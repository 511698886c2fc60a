"""`regionnet-export quantize=int8` (regionnet.quantize) and `regionnet-predict
backend=onnxruntime onnx_path=FILE` on the shared phantom checkpoint: the int8 file predicts
what float32 does within a loose tolerance and its sidecar holds the AUROC facts; an
impossible margin refuses and writes nothing; predicting with the exported file gives the
torch rows; missing and corrupt files, a sidecar of another model, missing onnxruntime."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image
from test_onnx_backend import assert_same_rows, mixed_folder  # noqa: F401  (fixture)
from test_predict import phantom_u8, predict_config

from regionnet.config import compose_config
from regionnet.export import export
from regionnet.model.module import load_regionnet
from regionnet.predict import predict
from regionnet.quantize import QuantizationRefused, film_table, int8_path, load_films, pick

ort = pytest.importorskip("onnxruntime", reason="quantize=int8 needs onnxruntime (export extra)")
pytest.importorskip("onnx", reason="quantize=int8 needs onnx (export extra)")

INT8_ATOL = 0.1  # int8 probabilities of the phantom model stay this close to float32


def export_config(ckpt: Path, out: Path, *overrides: str):
    return compose_config("export", [f"ckpt_path={ckpt}", f"output={out}", *overrides])


@pytest.fixture(scope="module")
def int8_export(phantom_checkpoint, tmp_path_factory) -> Path:  # noqa: F811
    """model.onnx and model.int8.onnx of the phantom checkpoint (calibrated on its train
    split, guarded on its val split)."""
    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    export(export_config(phantom_checkpoint, out, "quantize=int8", "calibration_films=32"))
    return out


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probs"], {"image": x})[0]


def test_int8_export_is_close_to_fp32_and_records_the_auroc(int8_export):
    q8 = int8_path(int8_export)
    assert q8.name == "model.int8.onnx" and q8.is_file()
    meta = json.loads(q8.with_name(q8.name + ".json").read_text())
    fp32_meta = json.loads(int8_export.with_name("model.onnx.json").read_text())
    assert meta["model_file"] == "model.int8.onnx" and "quantization" not in fp32_meta
    assert meta["regions"] == fp32_meta["regions"] and meta["image_size"] == 32
    facts = meta["quantization"]
    assert facts["calibration"] == "train" and facts["calibration_films"] == 32
    # auto: both calibrations tried, the one closer to float32 on the guard films kept
    tried = facts["calibrate_methods_tried"]
    assert set(tried) == {"percentile", "minmax"}
    assert facts["calibrate_method"] == min(tried, key=tried.get)
    assert facts["guard_split"] == "val" and facts["guard_films"] > 100
    assert facts["max_auroc_drop"] == 0.005
    # every phantom head has positives and negatives in val: one AUROC pair per head
    assert set(facts["auroc"]) == set(meta["regions"])
    drops = [h["auroc_fp32"] - h["auroc_int8"] for h in facts["auroc"].values()]
    assert facts["mean_auroc_drop"] == pytest.approx(np.mean(drops), abs=1e-5)
    assert facts["mean_auroc_drop"] <= 0.005
    assert min(h["auroc_fp32"] for h in facts["auroc"].values()) > 0.9  # a working model
    # int8: a quarter of the float32 weights' bytes or so, and QDQ nodes in the graph
    assert facts["int8_file_bytes"] < 0.6 * facts["fp32_file_bytes"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(q8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # same probabilities as float32 within a loose tolerance, on films of the test split (not
    # seen by calibration or guard); random noise would lie outside the calibrated ranges
    ckpt = Path(fp32_meta["checkpoint"])
    model = load_regionnet(ckpt)
    films = film_table("test", list(model.regions), ckpt, "test")
    x, _, _ = load_films(films, model)
    p32, p8 = run(int8_export, x), run(q8, x)
    assert p8.shape == p32.shape == (len(films), len(meta["regions"]))
    assert np.abs(p8 - p32).max() < INT8_ATOL, np.abs(p8 - p32).max()
    assert facts["max_abs_prob_diff_vs_fp32"] < INT8_ATOL
    print(
        f"int8 vs fp32: mean AUROC drop {facts['mean_auroc_drop']:+.4f}, max |dp| on guard "
        f"films {facts['max_abs_prob_diff_vs_fp32']:.4f}, {facts['int8_file_bytes']} vs "
        f"{facts['fp32_file_bytes']} bytes"
    )


def test_an_impossible_margin_refuses_and_writes_nothing(phantom_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "m" / "model.onnx"
    cfg = export_config(
        phantom_checkpoint, out, "quantize=int8", "calibration_films=16", "max_auroc_drop=-1"
    )
    with pytest.raises(QuantizationRefused, match=r"max_auroc_drop=-1.*Nothing was written"):
        export(cfg)
    assert list(out.parent.iterdir()) == []  # neither model.onnx, model.int8.onnx nor scratch


def test_guard_films_without_both_classes_are_named(phantom_checkpoint, tmp_path):  # noqa: F811
    guard = tmp_path / "guard"
    (guard / "hand").mkdir(parents=True)
    for seed in range(4):
        Image.fromarray(phantom_u8("hand", 9100 + seed)).save(guard / "hand" / f"{seed}.png")
    cfg = export_config(
        phantom_checkpoint,
        tmp_path / "out" / "model.onnx",
        "quantize=int8",
        "calibration_films=16",
        f"guard_split={guard}",
    )
    # hand: positives only; every other head: negatives only
    with pytest.raises(ValueError, match=r"4 guard films.*no head with both classes.*guard_split"):
        export(cfg)
    assert list((tmp_path / "out").iterdir()) == []


def test_quantize_needs_onnx_format_and_a_split(phantom_checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="quantize=int8 needs format=onnx"):
        export(export_config(phantom_checkpoint, tmp_path / "m.ts", "format=torchscript",
                             "quantize=int8"))  # fmt: skip
    with pytest.raises(ValueError, match="quantize='int4'"):
        export(export_config(phantom_checkpoint, tmp_path / "m.onnx", "quantize=int4"))
    with pytest.raises(FileNotFoundError, match="calibration='nowhere': neither a split"):
        export(
            export_config(
                phantom_checkpoint, tmp_path / "m.onnx", "quantize=int8", "calibration=nowhere"
            )
        )
    for bad, match in (("calibrate_method=maxmin", "calibrate_method='maxmin'"),
                       ("calibrate_percentile=50", "calibrate_percentile=50.0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            export(export_config(phantom_checkpoint, tmp_path / "m.onnx", "quantize=int8", bad))
    assert not (tmp_path / "m.onnx").exists()


def test_pick_takes_every_region_in_turn():
    records = pd.DataFrame(
        {"path": [f"f{i}" for i in range(30)], "region": ["knee"] * 27 + ["pelvis"] * 3}
    )
    chosen = pick(records, 6)
    assert len(chosen) == 6 and (chosen["region"] == "pelvis").sum() == 3
    assert pick(records, None) is records


def test_predict_with_onnx_path_matches_torch(
    phantom_checkpoint,  # noqa: F811
    int8_export,
    mixed_folder,  # noqa: F811
    tmp_path,
):
    torch_out, onnx_out = tmp_path / "t.csv", tmp_path / "o.csv"
    st = predict(predict_config(phantom_checkpoint, mixed_folder, torch_out))
    so = predict(
        predict_config(
            phantom_checkpoint,
            mixed_folder,
            onnx_out,
            "backend=onnxruntime",
            f"onnx_path={int8_export}",
        )
    )
    rows_t = pd.read_csv(torch_out, dtype=str, keep_default_na=False)
    rows_o = pd.read_csv(onnx_out, dtype=str, keep_default_na=False)
    meta = json.loads(int8_export.with_name("model.onnx.json").read_text())
    # the float32 file: the torch rows, but for model_id, which names the file
    assert so["model_id"] == meta["onnx_model_id"] != st["model_id"]
    assert set(rows_o["model_id"]) == {so["model_id"]}
    rows_o["model_id"] = st["model_id"]
    assert_same_rows(rows_t, rows_o)

    # the int8 file without the checkpoint: regions, thresholds, preprocessing from its sidecar
    q8 = int8_path(int8_export)
    q8_out = tmp_path / "q8.csv"
    s8 = predict(
        compose_config(
            "predict",
            [
                "ckpt_path=null",
                f"input={mixed_folder}",
                f"output={q8_out}",
                "accelerator=cpu",
                "num_workers=0",
                "batch_size=4",
                "backend=onnxruntime",
                f"onnx_path={q8}",
            ],
        )
    )
    rows_8 = pd.read_csv(q8_out, dtype=str, keep_default_na=False)
    assert list(rows_8.columns) == list(rows_t.columns)
    assert (
        s8["model_id"] == json.loads(q8.with_name(q8.name + ".json").read_text())["onnx_model_id"]
    )
    assert s8["errors"] == st["errors"] and s8["ok"] == st["ok"]
    a = rows_t.sort_values("path").reset_index(drop=True)
    b = rows_8.sort_values("path").reset_index(drop=True)
    ok = a["status"] == "ok"
    p_cols = [c for c in a.columns if c.startswith("p_")]
    diff = np.abs(
        a.loc[ok, p_cols].astype(float).to_numpy() - b.loc[ok, p_cols].astype(float).to_numpy()
    )
    assert diff.max() < INT8_ATOL
    # the region differs only where a probability sits within the tolerance of a threshold
    agree = (a.loc[ok, "region"] == b.loc[ok, "region"]).mean()
    assert agree >= 0.8, agree


def test_onnx_path_errors_name_the_file(phantom_checkpoint, int8_export, mixed_folder, tmp_path):  # noqa: F811
    out = tmp_path / "p.csv"

    def run_with(path, *more):
        return predict(
            predict_config(
                phantom_checkpoint, mixed_folder, out, "backend=onnxruntime",
                f"onnx_path={path}", *more,
            )
        )  # fmt: skip

    with pytest.raises(FileNotFoundError, match=r"onnx_path='.*nope\.onnx' does not exist"):
        run_with(tmp_path / "nope.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(int8_export.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"broken\.onnx.*not a readable ONNX file"):
        run_with(broken)
    # a sidecar of another model: other thresholds
    copy = tmp_path / "copy.onnx"
    shutil.copy(int8_export, copy)
    meta = json.loads(int8_export.with_name("model.onnx.json").read_text())
    meta["thresholds"] = [0.123] * len(meta["thresholds"])
    copy.with_name("copy.onnx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"not exported from.*thresholds.*ckpt_path=null"):
        run_with(copy)
    with pytest.raises(ValueError, match="onnx_path needs backend=onnxruntime"):
        predict(predict_config(phantom_checkpoint, mixed_folder, out, f"onnx_path={copy}"))
    assert not out.exists()


def test_missing_onnxruntime_says_how_to_install(phantom_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    out = tmp_path / "model.onnx"
    with pytest.raises(ImportError, match=r"quantize=int8 needs onnxruntime.*regionnet\[export\]"):
        export(export_config(phantom_checkpoint, out, "quantize=int8"))
    assert not out.exists()
