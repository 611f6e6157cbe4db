"""Mixture-of-Head utilisation plot: share of tokens on which each head is active, per layer, per epoch."""

from __future__ import annotations

from pathlib import Path

from recsys.tracking.figures import pyplot, save_figure


def plot_head_utilisation(history: list[dict[str, list[float]]], path: Path, title: str) -> Path | None:
    """One panel per layer (``<branch>/block<i>``), one line per head against epoch; atomic PNG write.

    ``history[e]`` maps layer name -> ``[h]`` mean utilisation in [0, 1] of epoch ``e + 1`` (plotted from 1).
    """
    layers = sorted({name for row in history for name in row})
    if not layers:
        return None
    plt = pyplot()

    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        points = [(epoch, row[layer]) for epoch, row in enumerate(history, start=1) if layer in row]
        epochs = [e for e, _ in points]
        for head in range(len(points[0][1])):
            ax.plot(epochs, [u[head] for _, u in points], marker="o", label=f"head {head}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("epoch")
        ax.set_ylabel("active share of tokens")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title, fontsize=9)
