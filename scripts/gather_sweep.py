"""Gather a regionnet sweep directory into one table (printed, and written as CSV/Markdown).

    python scripts/gather_sweep.py outputs/train/multiruns/2025-01-31_12-00-00 [--out DIR]

One row per job: backbone, image size, LR, fold, val/test AUROC mean and min, parameters,
training radiographs/s. For k-fold sweeps (hparams_search=kfold) also mean ± sd over folds and
the AUROC of all folds' test predictions pooled. See regionnet/sweep.py.
"""

from regionnet.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
