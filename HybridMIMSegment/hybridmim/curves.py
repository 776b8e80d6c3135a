"""Training curves as a PNG (matplotlib): one panel per logged quantity against the step."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_output

_NOT_PLOTTED = {"step", "epoch", "lr", "seconds", "seconds_per_step"}


REDRAW_SECONDS = 60.0  # a drawing takes about a second: on the way, a run draws its curve at most once a minute


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """``history``: metric events ({"step": …, "loss": …, …}); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in dict.fromkeys(k for h in history for k in h)  # every quantity, even if not logged each time
             if k not in _NOT_PLOTTED and any(isinstance(h.get(k), (int, float)) for h in history)]
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, name in zip(axes.flat, names):
        logged = [(step, h[name]) for step, h in zip(steps, history) if isinstance(h.get(name), (int, float))]
        values = [v for _, v in logged]
        ax.plot([step for step, _ in logged], values, lw=1.2, marker="." if len(logged) < 30 else None)
        if min(values) > 0 and max(values) > 10 * min(values):  # losses falling by orders of magnitude
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
