"""Self-supervised pretraining of a timm backbone on unlabelled radiographs.

`regionnet-pretrain`: see regionnet/pretrain.py.
"""
