"""RESULTS.md from the results dict of a benchmark run (every number comes from it).

RESULTS.md is committed: it names files relative to the repository, the shared data or the
output folder (`regionnet.bench.paths.relativise`), never by this machine's absolute paths.
"""

from __future__ import annotations

from regionnet.bench.paths import relativise, run_paths


def _f(x, nd=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def _accuracy(name: str, run: dict) -> list[str]:
    ev, regions = run["eval"], run["eval"].get("regions", [])
    lines = [
        f"### {name}",
        "",
        *([f"Model: {_model(run['settings'])}.  "] if "settings" in run else []),
        f"Overrides: `{' '.join(run['overrides'])}`  ",
        f"Training: {_f(run['train_seconds'] / 60, 1)} min wall, "
        f"{_f(run['train_images_per_s'], 1)} training radiographs/s; "
        f"time to `val/auroc_mean` ≥ 0.99: {_f(run['seconds_to_val_auroc_mean_0.99'], 0)} s.  ",
        f"Checkpoint: `{run['checkpoint']}`",
        "",
        "| head | test images (+) | AUROC [95% CI] | sensitivity | specificity | threshold |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in regions:
        pos = ev.get(f"test/positives/{r}")
        if f"test/auroc/{r}" not in ev:
            lines.append(f"| {r} | {_f(pos, 0)} | no real positives in test | | | |")
            continue
        auc = f"{_f(ev[f'test/auroc/{r}'])} {_ci(ev.get(f'test/auroc_ci/{r}'))}"
        lines.append(
            f"| {r} | {_f(pos, 0)} | {auc}"
            f" | {_f(ev.get(f'test/sensitivity/{r}'))} | {_f(ev.get(f'test/specificity/{r}'))}"
            f" | {_f(ev.get(f'test/threshold/{r}'))} |"
        )
    lines += [
        "",
        f"AUROC mean {_f(ev.get('test/auroc_mean'))}, min {_f(ev.get('test/auroc_min'))}; "
        f"top-1 region accuracy {_f(ev.get('test/top1_acc'))}; "
        f"out-of-set films called `unknown`: {_f(ev.get('test/unknown_rate_other'))}.",
        "",
        "| out-of-set anatomy (test) | images | called `unknown` | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    for anatomy, u in sorted(run["breakdown"]["unknown_share_by_anatomy"].items()):
        lines.append(f"| {anatomy} | {u['images']} | {u['unknown']} | {_f(u['share'])} |")
    lines += [
        "",
        "Within the fracture-film source only (shoulder, elbow, finger, forearm, humerus and wrist "
        "films from one export: no source shortcut, anatomy is the only cue):",
        "",
        "| head | positives | negatives | AUROC [95% CI, by patient] |",
        "| --- | ---: | ---: | --- |",
    ]
    for r, w in run["breakdown"]["within_fracture_source"].items():
        lines.append(
            f"| {r} | {w['positives']} | {w['negatives']} | {_f(w['auroc'])} {_ci(w['ci'])} |"
        )
    fr = run["fullres"]
    lines += [
        "",
        f"Full-resolution originals ({fr['images']} files: hands must be `hand`, chests "
        f"`unknown`): accuracy {_f(fr['accuracy'])} ("
        + ", ".join(f"{a} {_f(v)}" for a, v in fr["accuracy_by_anatomy"].items())
        + f"); predicted {fr['predicted']}.",
        "",
    ]
    return lines


def _weights(st: dict) -> str:
    if st.get("weights_file"):
        return f"weights from `{st['weights_file']}`"
    return "ImageNet weights" if st.get("pretrained") else "random init"


def _model(st: dict) -> str:
    """Backbone, starting weights, input size and epochs as the run resolved them."""
    return (
        f"`{st.get('backbone')}`, {_weights(st)}, {st.get('image_size')} px, "
        f"{st.get('max_epochs')} epochs max, augment factor {st.get('augment_factor')}, "
        f"{st.get('precision')}"
    )


def _study_model(run: dict) -> str:
    st = run.get("settings")
    if st is None:  # results from before the runs recorded their settings
        return "ResNet-18 from random init — no ImageNet download here —"
    return f"`{st.get('backbone')}` from {_weights(st)},"


def _speed(sp: dict) -> list[str]:
    sv = sp["shared_vs_separate"]
    lines = [
        "## Speed (model only, inference, this machine)",
        "",
        f"{sp['image_size']} px, batch {sp['batch']}, {sp['threads']} threads, median of repeated "
        "timed runs after warm-up.",
        "",
        "| design | radiographs/s |",
        "| --- | ---: |",
        f"| one shared ResNet-18 + 5 heads (regionnet) | {_f(sv['shared'], 1)} |",
        f"| five separate ResNet-18s (the study's design) | {_f(sv['separate'], 1)} |",
        f"| **ratio** | **{_f(sv['ratio'], 2)}x** |",
        "| the study's reported rate (GPU, for reference) | 33 |",
        "",
        "| precision / layout | radiographs/s |",
        "| --- | ---: |",
        *[f"| {k} | {_f(v, 1)} |" for k, v in sp["precision_layout"].items()],
        "",
        "| batch size | radiographs/s |",
        "| ---: | ---: |",
        *[f"| {k} | {_f(v, 1)} |" for k, v in sp["batch_sizes"].items()],
        "",
        "| image size (px) | radiographs/s |",
        "| ---: | ---: |",
        *[f"| {k} | {_f(v, 1)} |" for k, v in sp["image_sizes"].items()],
        "",
    ]
    rf = sp["roofline"]
    lines += [
        f"Compute: {_f(rf['gflop_per_image'], 2)} GFLOP per radiograph, "
        f"{_f(rf['achieved_gflops'], 1)} GFLOP/s achieved vs {_f(rf['matmul_gflops'], 1)} GFLOP/s "
        f"measured fp32 matmul roofline ({_f(100 * rf['fraction_of_roofline'], 0)} %).",
        "",
    ]
    if "predict" in sp:
        pr = sp["predict"]
        lines += [
            f"End-to-end `regionnet-predict` on {pr['files']} real files ({pr['input']}, "
            f"{pr['image_size']} px, decode + resize + model + CSV): "
            f"{_f(pr['end_to_end_per_s'], 1)} radiographs/s vs {_f(pr['model_only_per_s'], 1)} "
            f"model-only = {_f(100 * pr['fraction_of_model_only'], 0)} %.",
            "",
        ]
        q = pr.get("onnx_int8", {})
        if "onnx_int8_per_s" in pr:  # regionnet/bench/quantize.py (run.fastest_predict)
            lines += [
                f"ONNX Runtime, model only ({q['image_size']} px, batch {q['batch']}, "
                f"{q['threads']} threads): fp32 {_f(pr['onnx_fp32_per_s'], 1)}/s, int8 "
                f"{_f(pr['onnx_int8_per_s'], 1)}/s ({_f(q['speedup'], 2)}x); int8 test AUROC "
                f"change {_f(-q['int8_auroc_drop'], 4)} (mean over heads), same region on "
                f"{_f(100 * q['test_region_agreement'], 0)} % of test films. End to end with "
                f"the int8 file: {_f(pr.get('end_to_end_int8_per_s'), 1)} radiographs/s; fastest "
                f"backend within 0.005 AUROC: {pr.get('fastest_backend')}.",
                "",
            ]
        elif "refused" in q:
            lines += [f"int8 ONNX: refused by its AUROC guard ({q['refused']}).", ""]
        elif "skipped" in q:
            lines += [f"int8 ONNX: not measured ({q['skipped']}).", ""]
    dec = sp.get("decode")
    if dec:  # regionnet/bench/decode.py
        kinds = [k[: -len("_per_s_per_core")] for k in dec if k.endswith("_per_s_per_core")]
        kinds = [k for k in kinds if not k.endswith("_reduced")]
        lines += [
            f"Decode rate per core, full-resolution originals ({dec['films']} films, read + "
            f"letterbox to {dec['image_size']} px, one thread): full read vs reduced read.",
            "",
            "| format | full, films/s | reduced, films/s | speed-up |",
            "|---|---|---|---|",
        ]
        for k in kinds:
            lines.append(
                f"| {k} | {_f(dec[f'{k}_per_s_per_core'], 1)} | "
                f"{_f(dec[f'{k}_reduced_per_s_per_core'], 1)} | {_f(dec[f'{k}_speedup'], 2)}x |"
            )
        lines.append("")
    tr = sp.get("training", {})
    if "images_per_s" in tr:
        lines += [
            f"Training throughput {_f(tr['images_per_s'], 1)} radiographs/s; time to "
            f"`val/auroc_mean` ≥ 0.99: {_f(tr['seconds_to_val_auroc_mean_0.99'], 0)} s.",
            "",
        ]
    if "lightning_vs_plain_ratio" in tr:  # regionnet/bench/overhead.py
        st, lt, pl = tr["overhead_setting"], tr["breakdown"]["lightning"], tr["breakdown"]["plain"]
        lines += [
            f"Framework overhead ({st['image_size']} px, {st['epochs']} epoch(s), median of "
            f"{st['repeats']} alternated pairs, {st['torch_threads']} torch thread(s)): "
            f"`regionnet-train` {_f(tr['lightning_s'], 1)} s vs the same training in a plain "
            f"PyTorch loop {_f(tr['plain_s'], 1)} s, **{_f(tr['lightning_vs_plain_ratio'], 2)}x** "
            f"(fit alone {_f(tr['fit_ratio'], 2)}x; CPU seconds of the process "
            f"{_f(tr['cpu_ratio'], 2)}x, of the fit {_f(tr.get('fit_cpu_ratio'), 2)}x). Last "
            f"Lightning fit: training_step "
            f"{_f(lt['training_step_s'], 1)} s, backward {_f(lt['backward_s'], 1)} s, data "
            f"{_f(lt['train_dataloader_s'], 1)} s, validation "
            f"{_f(lt['validation_step_s'] + lt['validation_dataloader_s'], 1)} s, checkpoints "
            f"{_f(lt['checkpoint_writes_s'], 1)} s, loop/logging {_f(lt['loop_other_s'], 1)} s; "
            f"plain: forward {_f(pl['forward_s'], 1)} s, backward {_f(pl['backward_s'], 1)} s. "
            "After the fit `regionnet-train` spends "
            f"{_f(tr['breakdown']['lightning_after_fit_s'], 1)} s (final validation, test, "
            "test predictions, outputs) vs "
            f"{_f(tr['breakdown']['plain_test_s'], 1)} s for the plain loop's test pass.",
            "",
        ]
    gpu = sp.get("gpu")
    if gpu and "skipped" in gpu:
        lines += [f"GPU: {gpu['skipped']}.", ""]
    elif gpu:
        lines += [
            f"GPU ({gpu['device']}, {gpu['image_size']} px, batch {gpu['batch']}):",
            "",
            "| setting | inference radiographs/s | training radiographs/s |",
            "| --- | ---: | ---: |",
            *[
                f"| {k} | {_f(v, 1)} | {_f(gpu['training'][k], 1)} |"
                for k, v in gpu["inference"].items()
            ],
            "",
        ]
    return lines


def _scaling(sc: dict) -> list[str]:
    lines = [
        "## Cost curves",
        "",
        "![scaling](scaling.png)",
        "",
        f"| batch ({sc.get('size_for_batches', 224)} px) | radiographs/s | peak RSS MiB "
        "| of which inference MiB |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {b} | {_f(v['rate'], 1)} | {_f(v['peak_mib'], 0)} | {_f(v['inference_mib'], 0)} |"
        for b, v in sc["by_batch"].items()
    ]
    lines += [
        "",
        f"| size px (batch {sc.get('batch_for_sizes', 8)}) | radiographs/s | peak RSS MiB "
        "| of which inference MiB |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {z} | {_f(v['rate'], 1)} | {_f(v['peak_mib'], 0)} | {_f(v['inference_mib'], 0)} |"
        for z, v in sc["by_size"].items()
    ]
    return [*lines, ""]


def _backbones(bb: dict) -> list[str]:
    lines = [
        "## Backbones (Hydra multirun on the real data)",
        "",
        f"{bb['image_size']} px, {bb['epochs']} epochs each, {bb.get('precision')}; "
        f"sweep dir `{bb['sweep_dir']}`.",
        "",
        "| backbone | test AUROC mean | min head AUROC | params (M) | train img/s | infer img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in bb["rows"]:
        params = r.get("params")
        auc = f"{_f(r.get('test_auroc_mean'))} | {_f(r.get('test_auroc_min'))}"
        lines.append(
            f"| {r.get('backbone')} | {auc}"
            f" | {_f(params / 1e6 if params else None, 2)} | {_f(r.get('images_per_s'), 1)}"
            f" | {_f(r.get('infer_images_per_s'), 1)} |"
        )
    return [*lines, ""]


def _provenance(m: dict) -> str:
    where = f"{m['cpu']}, GPU: {m['gpu']}"
    return f"`{m['command']}` at commit `{m['commit']}` on {m['date']} ({where})"


SSL_NAMES = {
    "scratch": "scratch (random init)",
    "base": "ImageNet, no SSL",
    "ssl": "SSL-pretrained",
    "ssl_recipe": "SSL + recipe",
}


def _ssl(ss: dict) -> list[str]:
    st, pre = ss["settings"], ss["pretrain"]
    rows = [k for k in SSL_NAMES if k in ss]
    regions = ss[rows[0]]["eval"].get("regions", [])
    lines = [
        "## Self-supervised pretraining and the stronger recipe",
        "",
        f"Measured by {_provenance(ss['machine'])}. `regionnet-pretrain ssl={st['method']}` on "
        f"{pre['pretrain/images']} films (../shared/data/unlabeled plus the labelled training "
        f"split without labels; val/test never), starting from "
        f"{'ImageNet weights' if st.get('start') == 'imagenet' else 'random init'}, "
        f"{st['pretrain_image_size']} px views, "
        f"{pre['pretrain/epochs']} epochs ({pre['pretrain/steps']} steps) in "
        f"{_f(pre['wall_seconds'] / 60, 1)} min (budget {st['pretrain_minutes_max']} min, "
        f"{st['precision']}). Then each row fine-tunes the study protocol on the same split at "
        f"{st['image_size']} px for {st['epochs']} epochs (augment factor "
        f"{st.get('augment_factor', 1)}); the recipe row is "
        f"`experiment={st['recipe']}`, chosen on the validation split before this run.",
        "",
        "| | " + " | ".join(SSL_NAMES[k] for k in rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(ss[k]) for k in rows) + " |")

    for r in regions:
        row(
            f"test AUROC {r} [95% CI]",
            lambda x, r=r: (
                f"{_f(x['eval'].get(f'test/auroc/{r}'))} {_ci(x['eval'].get(f'test/auroc_ci/{r}'))}"
            ),
        )
    for r in ("shoulder", "elbow"):
        row(
            f"within fracture source, {r} [95% CI]",
            lambda x, r=r: (
                f"{_f(x['breakdown']['within_fracture_source'][r]['auroc'])} "
                f"{_ci(x['breakdown']['within_fracture_source'][r]['ci'])}"
            ),
        )
    anatomies = sorted(ss[rows[0]]["breakdown"]["unknown_share_by_anatomy"])
    for a in anatomies:
        row(
            f"{a} films called `unknown`",
            lambda x, a=a: (
                f"{x['breakdown']['unknown_share_by_anatomy'][a]['unknown']}/"
                f"{x['breakdown']['unknown_share_by_anatomy'][a]['images']}"
            ),
        )
    row("all out-of-set films rejected", lambda x: _f(x["operating_point"]["other_rejected"]))
    row(
        "in-set sensitivity (true head fires)",
        lambda x: _f(x["operating_point"]["in_set_sensitivity"]),
    )
    row("in-set top-1 region", lambda x: _f(x["operating_point"]["in_set_top1"]))
    row("threshold method", lambda x: f"`{x['eval'].get('threshold_method')}`")
    row("val AUROC mean (best epoch)", lambda x: _f(x.get("val_auroc_mean_best")))
    row("fine-tune wall min", lambda x: _f(x["train_seconds"] / 60, 1))
    lines += ["", *[f"- {SSL_NAMES[k]}: `{' '.join(ss[k]['overrides'])}`" for k in rows], ""]
    return lines


TRANSFER_NAMES = {
    "scratch": "scratch (random init)",
    "imagenet": "ImageNet",
    "imagenet_recipe": "ImageNet + recipe",
}


def _met(t: dict) -> str:
    v = t["value"]
    shown = f"{_f(v[0])} at {_f(v[1])}" if isinstance(v, list) else _f(v)
    return f"{shown} **{'met' if t['met'] else 'missed'}**"


def _transfer(tr: dict) -> list[str]:
    st, rows = tr["settings"], [k for k in TRANSFER_NAMES if k in tr["rows"]]
    runs = {k: tr["rows"][k] for k in rows}
    first = runs[rows[0]]
    regions = first["eval"].get("regions", [])
    lines = [
        "## Transfer learning: scratch vs ImageNet vs ImageNet + recipe",
        "",
        f"Measured by {_provenance(tr['machine'])}; section wall time "
        f"{_f(tr['wall_seconds'] / 60, 1)} min. {tr['data']['images']} radiographs: "
        f"{tr['data']['by_anatomy']}. Three trainings on one patient-grouped split (the first "
        f"row's `split.csv`, reused through `data.split_file`): `experiment={st['experiment']}` "
        f"from random init, the same with ImageNet weights, and `experiment={st['recipe']}` "
        "with ImageNet weights. The experiment configs decide backbone, input size, epochs and "
        "augmentation unless stated in the overrides below. Test split only for every figure "
        "but the external set; AUROC CIs are 95 % percentile bootstraps by patient.",
        "",
        "| | " + " | ".join(TRANSFER_NAMES[k] for k in rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(runs[k]) for k in rows) + " |")

    row("backbone", lambda x: f"`{x['settings'].get('backbone')}`")
    row("starting weights", lambda x: _weights(x["settings"]))
    row(
        "px / epochs max / augment factor",
        lambda x: (
            f"{x['settings'].get('image_size')} / {x['settings'].get('max_epochs')} / "
            f"{x['settings'].get('augment_factor')}"
        ),
    )
    row("threshold method", lambda x: f"`{x['eval'].get('threshold_method')}`")
    for r in regions:
        row(
            f"test AUROC {r} [95% CI] (+{_f(first['eval'].get(f'test/positives/{r}'), 0)})",
            lambda x, r=r: (
                f"{_f(x['eval'].get(f'test/auroc/{r}'))} {_ci(x['eval'].get(f'test/auroc_ci/{r}'))}"
            ),
        )
    for r in regions:
        row(
            f"{r}: sensitivity / specificity at threshold",
            lambda x, r=r: (
                f"{_f(x['eval'].get(f'test/sensitivity/{r}'))} / "
                f"{_f(x['eval'].get(f'test/specificity/{r}'))} "
                f"(t={_f(x['eval'].get(f'test/threshold/{r}'), 2)})"
            ),
        )
    for r in ("shoulder", "elbow"):
        row(
            f"within fracture source, {r} [95% CI]",
            lambda x, r=r: (
                f"{_f(x['breakdown']['within_fracture_source'][r]['auroc'])} "
                f"{_ci(x['breakdown']['within_fracture_source'][r]['ci'])}"
            ),
        )
    ext = first["external"]
    if ext.get("images"):
        row(
            f"external shoulders ({ext['images']}): top region `shoulder`",
            lambda x: _f(x["external"]["top_region_shoulder"]),
        )
        row(
            "external: highest head shoulder (no threshold)",
            lambda x: _f(x["external"]["highest_head_shoulder"]),
        )
        row("external: shoulder head fires", lambda x: _f(x["external"]["shoulder_head_fires"]))
        row("external: `unknown`", lambda x: _f(x["external"]["unknown"]))
        row(
            "external: predicted region counts",
            lambda x: ", ".join(f"{k} {v}" for k, v in sorted(x["external"]["predicted"].items())),
        )
    anatomies = sorted(first["breakdown"]["unknown_share_by_anatomy"])
    for a in anatomies:
        row(
            f"{a} films called `unknown`",
            lambda x, a=a: (
                f"{x['breakdown']['unknown_share_by_anatomy'][a]['unknown']}/"
                f"{x['breakdown']['unknown_share_by_anatomy'][a]['images']} "
                f"({_f(x['breakdown']['unknown_share_by_anatomy'][a]['share'])})"
            ),
        )
    row(
        "all out-of-set films called `unknown`",
        lambda x: (
            f"{_f(x['operating_point']['other_rejected'])} "
            f"(of {x['operating_point']['other_images']})"
        ),
    )
    row(
        "in-set sensitivity (true head fires)",
        lambda x: (
            f"{_f(x['operating_point']['in_set_sensitivity'])} "
            f"(of {x['operating_point']['in_set_images']})"
        ),
    )
    row("in-set top-1 region at thresholds", lambda x: _f(x["operating_point"]["in_set_top1"]))
    row(
        "full-res originals: accuracy (hand / chest)",
        lambda x: (
            f"{_f(x['fullres']['accuracy'])} ("
            + " / ".join(_f(x["fullres"]["accuracy_by_anatomy"].get(a)) for a in ("hand", "chest"))
            + ")"
        ),
    )
    row(
        "full-res originals: predicted",
        lambda x: ", ".join(f"{k} {v}" for k, v in sorted(x["fullres"]["predicted"].items())),
    )
    for r in regions:
        row(
            f"ECE {r} ({st.get('ece_bins')} bins)",
            lambda x, r=r: _f(x["calibration"]["ece"].get(r)),
        )
    row("val AUROC mean (best epoch)", lambda x: _f(x.get("val_auroc_mean_best")))
    row("training wall min", lambda x: _f(x["train_seconds"] / 60, 1))
    row("training radiographs/s", lambda x: _f(x.get("train_images_per_s"), 1))
    row("evaluation wall s (test + external)", lambda x: _f(x.get("eval_seconds"), 0))
    lines += [
        "",
        "Top region = the predicted region: the most probable head among those at or above "
        "their thresholds, `unknown` when none is. Highest head = the most probable head, "
        "thresholds ignored. In-set sensitivity: the film's own head is at or above its "
        "threshold (another head may win).",
        "",
        "### Targets",
        "",
        "| target | bound | " + " | ".join(TRANSFER_NAMES[k] for k in rows) + " |",
        "| --- | --- |" + " --- |" * len(rows),
    ]
    for i, t in enumerate(first["targets"]):
        cells = " | ".join(_met(runs[k]["targets"][i]) for k in rows)
        lines.append(f"| {t['label']} | {t['target']} | {cells} |")
    hx = tr.get("hand_across_sources")
    if hx:
        lines += [
            "",
            f"### Hand across sources (`experiment={st['recipe']}`, ImageNet weights)",
            "",
            "Train and validate with one hand source's films only (plus every non-hand film "
            "of the split); test hand AUROC on the other source's hands against every non-hand "
            "test film. Derived from the main split: patients with a hand of the test source "
            "move to test whole, test-split hands of the training source are dropped.",
            "",
            "| train hands -> test hands | hands per source/split | test films (hands) "
            "| hand AUROC [95% CI] | sensitivity | specificity | threshold | ≥ 0.99 |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for h in hx.values():
            counts = ", ".join(f"{k} {v}" for k, v in sorted(h["hands"].items()))
            lines.append(
                f"| `{h['train_source']}` -> `{h['test_source']}` | {counts} "
                f"| {_f(h['test_images'], 0)} ({_f(h['test_hands'], 0)}) "
                f"| {_f(h['auroc'])} {_ci(h['ci'])} | {_f(h['sensitivity'])} "
                f"| {_f(h['specificity'])} | {_f(h['threshold'])} "
                f"| **{'met' if h['met'] else 'missed'}** |"
            )
    sp = tr.get("inference_speed")
    if sp:
        sizes = [str(z) for z in sp["sizes"]]
        lines += [
            "",
            "### Inference speed: the new default backbone vs ResNet-18",
            "",
            f"Model only (shared backbone + 5 heads, fp32, no grad), batch {sp['batch']}, "
            f"{sp['threads']} threads, median of timed runs after warm-up; GFLOP per "
            "radiograph counted by torch.",
            "",
            "| backbone | " + " | ".join(f"{z} px radiographs/s (GFLOP)" for z in sizes) + " |",
            "| --- |" + " ---: |" * len(sizes),
        ]
        for b, by_size in sp["rows"].items():
            cells = " | ".join(
                f"{_f(by_size[z]['per_s'], 1)} ({_f(by_size[z]['gflop_per_image'], 2)})"
                for z in sizes
            )
            lines.append(f"| `{b}` | {cells} |")
    if tr.get("reliability_png"):
        lines += [
            "",
            f"### Calibration of {TRANSFER_NAMES[st['best_row']]} (test split)",
            "",
            f"![reliability]({tr['reliability_png']})",
        ]
    cams = tr.get("cam_errors") or []
    if cams:
        lines += [
            "",
            f"### Grad-CAM of the worst test errors of {TRANSFER_NAMES[st['best_row']]}",
            "",
            "`missed`: in-set films whose own head is lowest; `false_call`: out-of-set films "
            "whose highest head is highest. Each map is Grad-CAM of the highest head. The "
            "overlays are written to the git-ignored `benchmarks/artifacts/` and not shown "
            "here: they are copies of the shared films, whose licences allow internal use only "
            "(../shared/data/README.md).",
            "",
            "| overlay (local) | film | kind | true | predicted | CAM head p | own head p |",
            "| --- | --- | --- | --- | --- | ---: | ---: |",
        ]
        lines += [
            f"| `{c['png']}` | `{c['file']}` | {c['kind']} | {c['anatomy']} "
            f"| {c['predicted']} | {c['cam_head']} {_f(c['cam_head_p'])} "
            f"| {_f(c['own_head_p'])} |"
            for c in cams
        ]
    lines += [
        "",
        *[f"- {TRANSFER_NAMES[k]}: `{' '.join(runs[k]['overrides'])}`" for k in rows],
        *[f"- checkpoint {TRANSFER_NAMES[k]}: `{runs[k]['checkpoint']}`" for k in rows],
        "",
    ]
    return lines


def markdown_report(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# regionnet benchmark results",
        "",
        f"Measured by `{m['command']}` at commit `{m['commit']}` on {m['date']}: "
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), GPU: {m['gpu']}, "
        f"Python {m['python']}, torch {m['torch']}. Total {res['wall_seconds'] / 60:.1f} min."
        + (" **Quick smoke run: numbers are not meaningful.**" if res.get("quick") else ""),
        "",
    ]
    if "machine_of_skipped" in res:
        lines += [
            "Sections this run skipped are kept from the earlier run: "
            + _provenance(res["machine_of_skipped"])
            + ".",
            "",
        ]
    if "accuracy" in res:
        acc = res["accuracy"]
        s = acc["settings"]
        lines += [
            "## Accuracy on real radiographs (../shared/data)",
            "",
            f"{acc['data']['images']} radiographs: {acc['data']['by_anatomy']}. Study protocol "
            f"(`experiment=yi2019`, {_study_model(acc['yi2019'])} "
            f"patient-grouped stratified 64/12/24 split, augmentation, other regions as "
            f"negatives) at {s['image_size']} px, {s['epochs']} epochs, augment factor "
            f"{s['augment_factor']}, {s['precision']}; accuracy section wall time "
            f"{acc['wall_seconds'] / 60:.1f} min. Hand, knee, pelvis and chest each come from one "
            "source, so their AUROC may reflect the source; the within-source table is the "
            "confound-free measure.",
            "",
        ]
        lines += _accuracy("Study protocol (yi2019)", acc["yi2019"])
        if "yi2019_crop" in acc:
            lines += _accuracy(
                "With crop augmentation hiding image size and crop style", acc["yi2019_crop"]
            )
        loso = acc["leave_one_source_out"]
        lines += [f"Leave-one-source-out: {loso['note']} {loso['regions_with_two_sources']}.", ""]
    if "ssl" in res:
        lines += _ssl(res["ssl"])
    if "transfer" in res:
        lines += _transfer(res["transfer"])
    if "landmarks" in res:
        from regionnet.bench.landmarks import landmarks_markdown

        lines += landmarks_markdown(res["landmarks"])
    if "findings" in res:
        from regionnet.bench.findings import findings_markdown

        lines += findings_markdown(res["findings"])
    if "compose" in res:
        from regionnet.bench.compose import compose_markdown

        lines += compose_markdown(res["compose"])
    if "speed" in res:
        lines += _speed(res["speed"])
    if "scaling" in res:
        lines += _scaling(res["scaling"])
    if "backbones" in res:
        lines += _backbones(res["backbones"])
    return relativise("\n".join(lines) + "\n", run_paths(res))
