"""RegionClassifier: the plain `nn.Module` of regionnet (backbone(s) + one head per region).

Input: (B, 1, S, S) single-channel radiographs, normalised with the checkpoint's `mean`/`std`
(see `regionnet.data.transforms.eval_transform`). Output of `forward`: a dict region -> logit
(B,); `sigmoid(logit)` is the probability that the film shows the region (one-vs-rest, so
every head may say no: `unknown`).

This is what export, Grad-CAM and the Python API run; the Lightning module
(`regionnet.model.module.RegionNet`) wraps it with losses, metrics and threshold calibration.

Backbones: `shared_backbone=true` puts one timm backbone under every head (regionnet's
design); `false` gives each head its own (the reference study's five separate detectors).
The choice is made once, in `backbone_of`; everything else asks `backbone_for(head)` or walks
`backbones`. A new head type (landmarks, findings, boxes) is a part with its own head modules
that reads the same backbone's features; see docs/architecture.md.

Finding heads (`finding_heads`, one per declared finding, `model.findings`): a binary head of
the same kind on the pooled features of the backbone of the finding's region, e.g. `knee_oa`
on the knee head's features, or, with `finding_backbone=separate`, on a backbone of their own
(`findings`, same architecture and starting weights) that the region heads never see: region
and finding heads then train separately in one checkpoint, at the cost of a second backbone
pass. `forward_findings(features)` gives their logits; `forward`, `logits` and
`predict_proba` (what an export holds) stay region-only and run the region backbones only.
An ordinal finding (`grades`, `ordinal`: name -> number of grades G) has an `OrdinalHead`
instead, G-1 logits of P(grade > k) (`regionnet.model.ordinal`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from regionnet.model.backbone import build_backbone, feature_dim
from regionnet.model.heads import region_head, region_heads
from regionnet.model.ordinal import OrdinalHead

SHARED = "shared"
#: the backbone of the finding heads with finding_backbone=separate
FINDINGS = "findings"
FINDING_BACKBONES = ("shared", "separate")


class RegionClassifier(nn.Module):
    """Backbone(s) and region heads; see the module docstring."""

    def __init__(
        self,
        regions: Sequence[str],
        backbones: nn.ModuleDict,
        backbone_of: dict[str, str],
        head_hidden: int = 0,
        head_dropout: float = 0.0,
        channels_last: bool = False,
        findings: Mapping[str, str] | None = None,
        ordinal: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.regions = list(regions)
        # finding name -> the region whose backbone features it reads
        self.finding_regions = dict(findings or {})
        bad = {f: r for f, r in self.finding_regions.items() if r not in self.regions}
        if bad:
            raise ValueError(f"findings {bad} name regions outside the heads {self.regions}")
        # a finding reads its region's backbone unless backbone_of names another
        own = {f: backbone_of.get(r) for f, r in self.finding_regions.items()}
        backbone_of = {**own, **backbone_of}
        heads = [*self.regions, *self.finding_regions]
        missing = [h for h in heads if backbone_of.get(h) not in backbones]
        if missing:
            raise ValueError(f"heads {missing} have no backbone in {list(backbones)}")
        self.backbones = backbones
        self.backbone_of = dict(backbone_of)
        self.channels_last = channels_last
        width = feature_dim(next(iter(backbones.values())))
        self.heads = region_heads(self.regions, width, head_hidden, head_dropout)
        # finding name -> number of grades, for the ordinal findings only
        self.finding_grades = dict(ordinal or {})
        if set(self.finding_grades) - set(self.finding_regions):
            raise ValueError(f"ordinal findings {self.finding_grades} are not all findings")
        # empty without findings: no parameters, so checkpoints without findings still load
        self.finding_heads = nn.ModuleDict(
            {
                f: OrdinalHead(width, self.finding_grades[f], head_hidden, head_dropout)
                if f in self.finding_grades
                else region_head(width, head_hidden, head_dropout)
                for f in self.finding_regions
            }
        )

    @property
    def findings(self) -> list[str]:
        """Finding names in declaration order."""
        return list(self.finding_regions)

    @property
    def shared(self) -> bool:
        """One backbone under every head."""
        return len(self.backbones) == 1

    def backbone_for(self, head: str) -> nn.Module:
        """The backbone whose pooled features feed `head`."""
        return self.backbones[self.backbone_of[head]]

    def unique_backbones(self) -> Iterator[nn.Module]:
        return iter(self.backbones.values())

    def forward_features(self, x: torch.Tensor, findings: bool = False) -> dict[str, torch.Tensor]:
        """Pooled features (B, F) per region head, and with `findings` per finding head too;
        each backbone those heads read runs once."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        heads = [*self.regions, *(self.finding_regions if findings else ())]
        names = dict.fromkeys(self.backbone_of[h] for h in heads)  # in order, once each
        by_backbone = {name: self.backbones[name](x) for name in names}
        return {h: by_backbone[self.backbone_of[h]] for h in heads}

    def forward_maps(
        self, x: torch.Tensor, indices: Sequence[int], findings: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """`forward_features(x, findings)` and the shared backbone's feature maps at `indices`
        (timm `feature_info` positions, e.g. the stride-8/16/32 stages) from the same single
        pass (timm `forward_intermediates`, then its pooling `forward_head`: the same pooled
        features as `forward_features`): what map-reading head types (landmarks, boxes,
        `regionnet.compose`) read beside the region heads. Shared backbone only."""
        if not self.shared or (findings and len(set(self.backbone_of.values())) > 1):
            raise ValueError(
                "feature maps for landmark or box heads come from one shared backbone: use "
                "model.shared_backbone=true and model.finding_backbone=shared"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        backbone = next(iter(self.backbones.values()))
        final, maps = backbone.forward_intermediates(x, indices=list(indices))
        pooled = backbone.forward_head(final)
        heads = [*self.regions, *(self.finding_regions if findings else ())]
        return dict.fromkeys(heads, pooled), dict(zip(indices, maps, strict=True))

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logit (B,) per region from `forward_features`' output."""
        return {r: self.heads[r](features[r]).squeeze(1) for r in self.regions}

    def forward_findings(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logit (B,) per binary finding, logits (B, G-1) of P(grade > k) per ordinal one, from
        `forward_features(x, findings=True)`' output."""
        out = {f: self.finding_heads[f](features[f]) for f in self.finding_regions}
        return {f: v if f in self.finding_grades else v.squeeze(1) for f, v in out.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def all_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region logits (B, R) in head order and finding logits (B, L) in finding order (one
        column per binary finding, G-1 per ordinal one) from one pass of each backbone; the
        finding part is (B, 0) without finding heads."""
        return self.logits_from(self.forward_features(x, findings=bool(self.finding_regions)))

    def logits_from(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`all_logits` from pooled features (`forward_features`, `forward_maps`)."""
        heads = self.forward_head(features)
        logits = torch.stack([heads[r] for r in self.regions], dim=1)
        if not self.finding_regions:
            return logits, logits[:, :0]
        found = self.forward_findings(features)
        # (B,) binary, (B, G-1) ordinal; no batch size in the shapes (an ONNX export keeps
        # its batch axis dynamic)
        return logits, torch.cat([v.unsqueeze(1) if v.dim() == 1 else v for v in found.values()], 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits stacked in head order, (B, R)."""
        out = self(x)
        return torch.stack([out[r] for r in self.regions], dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities per head of the plain forward, (B, R) float32: what an export holds."""
        return torch.sigmoid(self.logits(x).float())


def build_region_classifier(
    regions: Sequence[str],
    backbone: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    in_chans: int = 1,
    shared_backbone: bool = True,
    drop_path_rate: float = 0.0,
    head_hidden: int = 0,
    head_dropout: float = 0.0,
    channels_last: bool = False,
    findings: Mapping[str, str] | None = None,
    ordinal: Mapping[str, int] | None = None,
    finding_backbone: str = "shared",
) -> tuple[RegionClassifier, dict]:
    """The network and where its backbone's starting weights came from (`build_backbone`).
    `findings`: finding name -> region, one finding head each; `ordinal`: finding name ->
    number of grades, for the ordinal ones; `finding_backbone`: `shared` (the finding reads
    its region's backbone) or `separate` (one more backbone, `findings`, for them all)."""
    if finding_backbone not in FINDING_BACKBONES:
        raise ValueError(
            f"model.finding_backbone={finding_backbone!r}: use shared (the finding heads read "
            "their region's backbone) or separate (a backbone of their own)"
        )
    names = [SHARED] if shared_backbone else list(regions)
    separate = finding_backbone == "separate" and bool(findings)
    if separate:
        names.append(FINDINGS)
    built = {
        n: build_backbone(backbone, pretrained, weights_file, in_chans, drop_path_rate)
        for n in names
    }
    backbones = nn.ModuleDict({n: net for n, (net, _) in built.items()})
    backbone_of = {r: SHARED if shared_backbone else r for r in regions}
    if separate:
        backbone_of.update(dict.fromkeys(findings, FINDINGS))
    model = RegionClassifier(
        regions, backbones, backbone_of, head_hidden, head_dropout, channels_last, findings,
        ordinal,
    )  # fmt: skip
    return model, built[names[0]][1]


def legacy_state_dict(state: dict, prefix: str = "net.") -> dict:
    """Keys of checkpoints written before the network had its own module (`backbone.*`,
    `backbones.<region>.*`, `heads.*` on the Lightning module) renamed to today's
    (`net.backbones.shared.*`, `net.backbones.<region>.*`, `net.heads.*`)."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            key = f"{prefix}backbones.{SHARED}.{key[len('backbone.') :]}"
        elif key.startswith(("backbones.", "heads.")):
            key = prefix + key
        out[key] = value
    return out
