"""What the panel plots while a model trains: one table row per metric event of the run."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChartSpec:
    """A chart of metric events: ``x`` is the event field along the axis, ``series`` (field, legend) the curves."""

    title: str
    x: str
    series: tuple[tuple[str, str], ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.x, *(field for field, _ in self.series))


FINETUNE_CHART = ChartSpec("HybridMIM fine-tuning", "epoch", (("loss", "training loss"), ("dice", "validation Dice")))
PRETRAIN_CHART = ChartSpec("HybridMIM pre-training", "step", (("loss", "training loss"),))


def chart_row(spec: ChartSpec, metric: dict) -> list[float] | None:
    """The row ``metric`` adds (NaN where a curve has no value at that point), or None when it has no ``x``."""
    if metric.get(spec.x) is None:
        return None
    return [float(metric[field]) if metric.get(field) is not None else math.nan for field in spec.columns]
