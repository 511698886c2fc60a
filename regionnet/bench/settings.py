"""The settings of one benchmark run, in one frozen dataclass, and the run's log line."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

# the repository of an editable install (regionnet/bench/settings.py -> the repository root)
REPO = Path(__file__).resolve().parents[2]
SECTIONS = (
    "accuracy",
    "speed",
    "scaling",
    "backbones",
    "ssl",
    "transfer",
    "landmarks",
    "findings",
    "compose",
)
#: input size (px) of every training with `--quick`: a smoke test, no meaningful number
QUICK_SIZE = 32


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class FineTune:
    """Input size, epochs and augment factor of a fine-tune on the shared data; `None` leaves
    the value to the experiment config."""

    image_size: int | None = None
    epochs: int | None = None
    augment_factor: int | None = None


@dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run is asked to do; each field is a flag of
    scripts/benchmark.py (`repo` and `command` excepted). `quick_sized()` gives the `--quick`
    smoke-test sizes."""

    data_dir: Path
    out_dir: Path
    #: trainer.precision of every training
    precision: str
    #: a smoke test of every section: few batches, tiny images, no meaningful number
    quick: bool = False
    #: sections not to run
    skip: frozenset[str] = frozenset()
    #: keep the skipped sections of <out>/results.json
    merge: bool = False
    #: the accuracy section's fine-tunes (--image-size, --epochs, --augment-factor); the ssl
    #: section's fine-tunes use the same
    accuracy: FineTune = FineTune(112, 12, 1)
    #: the backbone sweep's input size and epochs
    backbone_size: int = 96
    backbone_epochs: int = 6
    #: regionnet-pretrain: view size (px), epochs, wall-time budget (min), method, start weights
    pretrain_size: int = 64
    pretrain_epochs: int = 10
    pretrain_minutes: int = 25
    ssl_method: str = "simclr"
    ssl_start: str = "imagenet"
    #: experiment config of the recipe rows (ssl and transfer sections)
    recipe: str = "recipe"
    #: experiment config of the transfer section's scratch and ImageNet rows, and its sizes
    transfer_experiment: str = "yi2019"
    transfer: FineTune = FineTune()
    #: trainer.accelerator of the transfer trainings
    transfer_accelerator: str = "cpu"
    #: the landmarks section: wall-clock budget of all its trainings (min) and input size (px)
    landmarks_minutes: float = 20.0
    landmarks_image_size: int = 256
    #: landmarks rows to run ("hand.two_step", ...), the others kept from `<out>/results.json`;
    #: empty: the default rows
    landmarks_rows: tuple[str, ...] = ()
    #: the findings section (issue 18): the budget its trainings' shares are taken of (min;
    #: 28 % per region run, 30 % for boxes: regionnet.bench.findings.RUNS)
    findings_minutes: float = 90.0
    #: findings runs to train ("knee_oa", ...), the others kept from `<out>/results.json` and
    #: their evaluations under artifacts/findings/; empty: all of them
    findings_runs: tuple[str, ...] = ()
    #: the compose section (issues 17, 18): the budget its five trainings' shares are taken
    #: of (min; 25 % each, at most: regionnet.bench.compose.RUNS)
    compose_minutes: float = 24.0
    #: the checkpoint of the speed section's end-to-end predict and int8 figures; None: the
    #: accuracy section's (measured only when that section runs)
    predict_ckpt: Path | None = None
    #: the repository whose code is measured (git commit, working directory of sub-runs)
    repo: Path = REPO
    #: the command line recorded in the results
    command: str = "python scripts/benchmark.py"

    def quick_sized(self) -> BenchSettings:
        """These settings at the `--quick` sizes (QUICK_SIZE px, one epoch). The sections
        shrink the rest themselves when `quick`: a few patients per source and region
        (`regionnet.bench.protocol.quick_data`), a few batches, a handful of full-resolution
        files, short timings at small sizes."""
        return replace(
            self,
            quick=True,
            accuracy=replace(self.accuracy, image_size=QUICK_SIZE, epochs=1),
            backbone_size=QUICK_SIZE,
            backbone_epochs=1,
            pretrain_size=QUICK_SIZE,
            pretrain_epochs=1,
            transfer=FineTune(QUICK_SIZE, 1, 1),
            landmarks_minutes=1.0,
            landmarks_image_size=QUICK_SIZE,
            findings_minutes=1.0,
            compose_minutes=1.0,
        )

    def runs(self, section: str) -> bool:
        return section not in self.skip

    @property
    def manifest_csv(self) -> Path:
        return self.data_dir / "radiographs" / "manifest.csv"

    @property
    def artifacts(self) -> Path:
        """Trained checkpoints and per-section JSON (git-ignored)."""
        return self.out_dir / "artifacts"

    @property
    def num_workers(self) -> int:
        """Data loader workers of every training, evaluation and prediction; `--quick`: none
        (in-process: a few dozen films do not pay for starting workers)."""
        return 0 if self.quick else 2

    @property
    def quick_manifest(self) -> Path:
        """`--quick`: the small manifest every fine-tune trains on (written by
        `regionnet.bench.protocol.quick_data`)."""
        return self.artifacts / "quick" / "quick_manifest.csv"

    @property
    def quick_external(self) -> Path:
        """`--quick`: the first external films, as a CSV (absent without external data)."""
        return self.artifacts / "quick" / "quick_external.csv"
