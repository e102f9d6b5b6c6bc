"""Matplotlib helpers shared by the lab notebooks and the lecture decks, so every lab's plots look alike."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt


def bar_chart(labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str, ax=None):
    """One bar per label, the value printed on top. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    bars = ax.bar(list(labels), list(values), color="#4C72B0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    return ax


def tradeoff_plot(points: dict[str, tuple[float, float]], *, xlabel: str, ylabel: str, title: str, ax=None):
    """A labelled scatter of (x, y) per name, e.g. saved memory against step time per checkpoint plan."""
    ax = ax or plt.subplots(figsize=(5, 4))[1]
    xs, ys = [x for x, _ in points.values()], [y for _, y in points.values()]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for name, (x, y) in sorted(points.items(), key=lambda item: item[1]):
        ax.scatter([x], [y], s=40)
        # a label near an earlier one goes below its point instead of above, so the two do not overlap
        crowded = any(abs(x - px) < 0.12 * x_span and abs(y - py) < 0.15 * y_span for px, py in placed)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -12 if crowded else 6), fontsize=8)
        placed.append((x, y))
    ax.margins(x=0.12, y=0.15)  # room for the labels at the edges
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str,
              logx: bool = False, logy: bool = False, ax=None):
    """Several named lines over the same x, e.g. TFLOP/s against sequence length."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax
