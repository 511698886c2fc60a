"""What the training sections of the benchmark share: the wall-clock budget of a run as
`trainer.max_time`, and a callback that records how far a run got in it."""

from __future__ import annotations

import time

from regionnet.callbacks import ImagesPerSecond


def max_time(minutes: float) -> str:
    """`trainer.max_time` (DD:HH:MM:SS) of a budget in minutes."""
    s = max(1, round(minutes * 60))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Timeline(ImagesPerSecond):
    """Epochs reached, wall seconds and chosen validation figures after each validation pass
    of the fit, and films per second in training batches (data loading counted; the counting
    is `ImagesPerSecond`'s, this process's films)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.keys = keys
        self.start = 0.0
        self.points: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the run's own ImagesPerSecond logs train/images_per_s; this one only counts

    @property
    def films_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    def on_validation_end(self, trainer, pl_module) -> None:
        # the fit's passes only (train() validates the best checkpoint again afterwards)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        point = {
            "epoch": int(trainer.current_epoch) + 1,  # the last one may be cut by max_time
            "step": int(trainer.global_step),  # optimizer steps so far
            "steps_per_epoch": int(trainer.num_training_batches),
            "seconds": round(time.perf_counter() - self.start, 1),
        }
        for key in self.keys:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                point[key] = round(float(value), 4)
        self.points.append(point)
