"""Composed models (issues 17, 18; `task=multi`): head types as parts of one model.

Region and finding heads (`RegionNet`) with a landmark part and a vertebra box part on one timm
backbone, one checkpoint, one backbone pass per film: `parts.py` (the parts), `module.py`
(`MultiNet`, `task = "multi"`), `data.py` (`MultiDataModule`: region films and a landmark set
in one table, absent targets masked), `infer.py` (loader, the API's arrays, predict columns),
`evaluate.py` (`regionnet-eval`) and `run.py` (what `train` writes after the fit).
"""
