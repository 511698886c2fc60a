"""The fastest safe training precision on this machine (`${regionnet.fast_precision:}`)."""

from __future__ import annotations

from pathlib import Path

import torch

# CPU features that run bf16 matrix maths natively; without them (e.g. an AVX2-only EPYC)
# PyTorch emulates bf16 and a ResNet-18 step is several times slower than in fp32.
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_precision() -> str:
    """`bf16-mixed` on a bf16-capable GPU or CPU, `16-mixed` on an older GPU, else `32-true`."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if BF16_CPU_FLAGS & cpu_flags() else "32-true"
