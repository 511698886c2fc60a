"""Landmark heads: points on a radiograph (vertebral corners, hand joints) found with DSNT.

Cina et al. 2021 (Sci Rep): a heatmap head with one channel per landmark and a differentiable
spatial-to-numerical transform (DSNT), refined in a second step on crops. Points travel in three
frames: original-image pixels (`landmarks.json`), network-input pixels of the letterboxed S x S
image, and normalised input coordinates in [-1, 1] (see `regionnet.landmarks.coords`).
"""
