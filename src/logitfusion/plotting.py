"""Plot of the fusion weights over decoding steps (the paper's figure of a over steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .engine.decoding import Generation


def plot_weights(generations: Sequence[Generation], expert_names: Sequence[str], path: str | Path,
                 max_panels: int = 6, title: str | None = None) -> Path:
    """One panel per sequence (up to `max_panels`), one line per expert. Needs trace=True."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    traced = [g for g in generations if g.weights][:max_panels]
    if not traced:
        raise ValueError("no weights to plot: generate with trace=True and a fusion solver "
                         "(static or dynamic) so that per-step weights are recorded")
    fig, axes = plt.subplots(len(traced), 1, figsize=(8, 2.2 * len(traced)), sharex=True, squeeze=False)
    for ax, gen in zip(axes[:, 0], traced):
        steps = range(len(gen.weights))
        for t, name in enumerate(expert_names):
            ax.plot(steps, [w[t] for w in gen.weights], marker=".", label=name)
        prompt = gen.prompt if len(gen.prompt) <= 60 else gen.prompt[:57] + "..."
        ax.set_title(repr(prompt), fontsize=9)
        ax.set_ylabel("weight a")
        ax.set_ylim(bottom=0)  # weights are >= 0; a shared floor makes panels comparable
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("decoding step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
