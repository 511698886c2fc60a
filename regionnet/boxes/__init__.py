"""Box heads (issue 18): a torchvision FCOS detector on the shared timm backbone through an FPN.

Its boxes are **vertebrae** (T1..L5 on AP spine films, each vertebra's box from its four
annotated corners), not lesions: `data.py` makes them from the landmark data, `model.py` is the
detector, `module.py` the Lightning module (`BoxNet`, `task = "boxes"`), `infer.py` the
checkpoint loader and per-film boxes, `predict.py` and `run.py` the outputs.
"""
