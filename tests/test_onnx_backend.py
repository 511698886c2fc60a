"""`regionnet-predict backend=onnxruntime` (regionnet.backends): the same rows as the torch
backend, probabilities within 1e-4, on the phantom checkpoint and a folder of PNGs, DICOMs and
broken files; with test-time flip; refusals; the install hint when onnxruntime is missing."""

from __future__ import annotations

import builtins
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from test_predict import predict_config, write_mixed_folder

from regionnet.predict import predict

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ATOL = 1e-4


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx_inputs") / "xr"
    write_mixed_folder(root)
    return root


def run_both(ckpt: Path, folder: Path, tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    frames, summaries = {}, {}
    for backend in ("torch", "onnxruntime"):
        out = tmp / f"{backend}.csv"
        start = time.perf_counter()
        summaries[backend] = predict(predict_config(ckpt, folder, out, f"backend={backend}"))
        summaries[backend]["wall"] = time.perf_counter() - start
        frames[backend] = pd.read_csv(out, dtype=str, keep_default_na=False)
    return frames["torch"], frames["onnxruntime"], summaries


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Identical rows but for the probabilities, which agree within ATOL; returns the worst."""
    assert list(a.columns) == list(b.columns)
    a, b = (
        a.sort_values("path").reset_index(drop=True),
        b.sort_values("path").reset_index(drop=True),
    )
    prob_cols = [c for c in a.columns if c.startswith("p_")]
    assert prob_cols
    rest = [c for c in a.columns if c not in prob_cols]
    pd.testing.assert_frame_equal(a[rest], b[rest])
    ok = a["status"] == "ok"
    pa = a.loc[ok, prob_cols].astype(float).to_numpy()
    pb = b.loc[ok, prob_cols].astype(float).to_numpy()
    worst = float(abs(pa - pb).max())
    assert worst <= ATOL, worst
    # error rows carry no probabilities in either
    assert (a.loc[~ok, prob_cols] == b.loc[~ok, prob_cols]).all().all()
    return worst


def test_onnxruntime_rows_match_torch(phantom_checkpoint, mixed_folder, tmp_path):  # noqa: F811
    rows_t, rows_o, summaries = run_both(phantom_checkpoint, mixed_folder, tmp_path)
    worst = assert_same_rows(rows_t, rows_o)
    st, so = summaries["torch"], summaries["onnxruntime"]
    assert so["backend"] == "onnxruntime" and st["backend"] == "torch"
    for key in ("ok", "unknown", "errors", "regions", "model_id"):
        assert st[key] == so[key], key
    assert so["errors"] == 4 and so["ok"] > 0
    assert set(rows_o["model_id"]) == {st["model_id"]}
    print(
        f"onnxruntime vs torch: max |dp| {worst:.2e}; loop {st['seconds']:.2f} s torch, "
        f"{so['seconds']:.2f} s onnxruntime; wall {st['wall']:.2f} s, {so['wall']:.2f} s"
    )


def test_onnxruntime_resume_appends_to_torch_output(phantom_checkpoint, mixed_folder, tmp_path):  # noqa: F811
    """Same model_id: an output begun with torch resumes with onnxruntime."""
    out = tmp_path / "p.csv"
    predict(predict_config(phantom_checkpoint, mixed_folder, out))
    summary = predict(
        predict_config(phantom_checkpoint, mixed_folder, out, "resume=true", "backend=onnxruntime")
    )
    assert summary["resumed"] > 0 and summary["ok"] == 0


def test_onnxruntime_tta_matches_torch(phantom_checkpoint, mixed_folder, tmp_path):  # noqa: F811
    ckpt = torch.load(phantom_checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["tta"] = True
    tta_ckpt = tmp_path / "tta.ckpt"
    torch.save(ckpt, tta_ckpt)
    rows_t, rows_o, _ = run_both(tta_ckpt, mixed_folder, tmp_path)
    assert_same_rows(rows_t, rows_o)


def test_onnxruntime_refuses_cam_and_precision(phantom_checkpoint, mixed_folder, tmp_path):  # noqa: F811
    out = tmp_path / "p.csv"
    cfg = predict_config(
        phantom_checkpoint,
        mixed_folder,
        out,
        "backend=onnxruntime",
        "cam=true",
        f"cam_dir={tmp_path / 'cam'}",
    )
    with pytest.raises(ValueError, match="cam=true needs torch"):
        predict(cfg)
    cfg = predict_config(
        phantom_checkpoint, mixed_folder, out, "backend=onnxruntime", "precision=bf16-mixed"
    )
    with pytest.raises(ValueError, match="precision=bf16-mixed.*32-true"):
        predict(cfg)
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        predict(predict_config(phantom_checkpoint, mixed_folder, out, "backend=tensorrt"))
    assert not out.exists()


def test_missing_onnxruntime_says_how_to_install(
    phantom_checkpoint,  # noqa: F811
    mixed_folder,
    tmp_path,
    monkeypatch,
):
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    out = tmp_path / "p.csv"
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'regionnet\[export\]'"):
        predict(predict_config(phantom_checkpoint, mixed_folder, out, "backend=onnxruntime"))
    assert not out.exists()
