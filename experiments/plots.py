"""Plots that a reader takes in at a glance (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probing.analysis import Candidate, LayerProfile  # noqa: E402
from probing.errors import InputError  # noqa: E402
from probing.score_table import ScoreTable  # noqa: E402

HARMFUL, BENIGN = "#c0392b", "#2e86c1"


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_distributions(tables: dict[str, ScoreTable], path: str | os.PathLike, *, score: str = "p_refuse") -> Path:
    """One panel per condition: harmful vs benign histograms of p_refuse (or margin).

    A safety shift moves both histograms right together; discrimination pulls them apart.
    """
    if score not in ("p_refuse", "margin"):
        raise InputError(f"score must be 'p_refuse' or 'margin', got {score!r}")
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), sharey=True, squeeze=False)
    values = {k: getattr(t, score).numpy() for k, t in tables.items()}
    allv = np.concatenate(list(values.values()))
    bins = np.linspace(0, 1, 21) if score == "p_refuse" else np.linspace(allv.min(), allv.max() + 1e-9, 25)
    for ax, (name, table) in zip(axes[0], tables.items()):
        lab = np.array(table.labels)
        v = values[name]
        for cls, colour in (("harmful", HARMFUL), ("benign", BENIGN)):
            sel = v[lab == cls]
            if len(sel):
                ax.hist(sel, bins=bins, alpha=0.55, color=colour, label=f"{cls} (mean {sel.mean():.2f})")
                ax.axvline(sel.mean(), color=colour, lw=2)
        if score == "p_refuse":
            ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.set_title(name)
        ax.set_xlabel("P(refuse)" if score == "p_refuse" else "refusal margin (logit)")
        ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    axes[0][0].set_ylabel("queries")
    fig.suptitle("Refusal scores, harmful vs benign, per condition", y=1.04)
    return _save(fig, path)


def plot_layer_profiles(profiles: list[LayerProfile], path: str | os.PathLike) -> Path:
    """Per-layer AUROC, d' and shift curves for several defenses (shaded: 95% intervals)."""
    panels = [("auroc_def", "AUROC harmful vs benign", "auroc_base"),
              ("dprime_def", "d' harmful vs benign", "dprime_base"),
              ("shift_sd", "common shift (baseline SDs)", None),
              ("differential_sd", "harmful minus benign shift (SDs)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colours = plt.cm.tab10.colors
    for ax, (fig_key, title, base_key) in zip(axes, panels):
        if base_key is not None and profiles:
            p0 = profiles[0]
            ax.plot(p0.layers, p0.values[base_key], color="black", ls="--", label="baseline")
        for i, p in enumerate(profiles):
            c = colours[i % len(colours)]
            ax.plot(p.layers, p.values[fig_key], color=c, marker="o", ms=3, label=f"{p.name} ({p.score})")
            ax.fill_between(p.layers, p.lo[fig_key], p.hi[fig_key], color=c, alpha=0.15)
        if base_key is None:
            ax.axhline(0, color="grey", lw=1)
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=8)
    fig.suptitle("Where in depth each defense acts", y=1.04)
    return _save(fig, path)


def plot_tradeoff(candidates: list[Candidate], path: str | os.PathLike) -> Path:
    """Safety (refusal on harmful) against helpfulness (compliance on benign), Pareto front joined."""
    markers = {"baseline": ("*", "black"), "single": ("o", "#34495e"), "+": ("s", "#d35400"), "|": ("^", "#8e44ad")}
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, (m, c) in markers.items():
        pts = [x for x in candidates if x.kind == kind]
        if pts:
            ax.scatter([x.helpfulness for x in pts], [x.safety for x in pts], marker=m, color=c, s=60,
                       label={"+": "a+b (predicted)", "|": "a|b (predicted)"}.get(kind, kind))
            for x in pts:
                ax.annotate(x.name, (x.helpfulness, x.safety), fontsize=7, xytext=(3, 3), textcoords="offset points")
    measured = [x for x in candidates if x.measured_safety is not None]
    for x in measured:
        ax.annotate("", (x.measured_helpfulness, x.measured_safety), (x.helpfulness, x.safety),
                    arrowprops=dict(arrowstyle="->", color="grey"))
    if measured:
        ax.scatter([x.measured_helpfulness for x in measured], [x.measured_safety for x in measured],
                   facecolors="none", edgecolors="grey", s=60, label="measured ensemble")
    front = sorted((x for x in candidates if x.pareto), key=lambda x: x.helpfulness)
    ax.plot([x.helpfulness for x in front], [x.safety for x in front], color="green", lw=1.5, label="Pareto front")
    ax.set_xlabel("helpfulness: compliance on benign")
    ax.set_ylabel("safety: refusal on harmful")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Safety / helpfulness trade-off")
    return _save(fig, path)
