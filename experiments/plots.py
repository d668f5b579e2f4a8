"""Plots that a reader takes in at a glance (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    axes[0].legend(fontsize=8)
    fig.suptitle("Where in depth each defense acts", y=1.04)
    return _save(fig, path)


def plot_tradeoff(candidates: list[Candidate], path: str | os.PathLike) -> Path:
    """Safety (refusal on harmful) against helpfulness (compliance on benign), Pareto front joined.

    Each point sits where the ranking puts it (measured where a measured run exists); filled
    markers are measured or exact, hollow ones predicted; a grey arrow runs from a pair's
    prediction to its measurement, so the prediction error is read off the plot."""
    markers = {"baseline": ("*", "black"), "single": ("o", "#34495e"), "+": ("s", "#d35400"), "|": ("^", "#8e44ad"),
               "&": ("v", "#16a085"), "~": ("D", "#2c3e50")}
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, (m, c) in markers.items():
        for source in ("measured", "exact", "predicted"):
            pts = [x for x in candidates if x.kind == kind and getattr(x, "source", "measured") == source]
            if not pts:
                continue
            face = "none" if source == "predicted" else c
            label = kind if kind in ("baseline", "single") else f"a{kind}b ({source})"
            ax.scatter([x.helpfulness for x in pts], [x.safety for x in pts], marker=m, facecolors=face,
                       edgecolors=c, s=60, label=label)
    for x in candidates:
        pred_s, pred_h = getattr(x, "predicted_safety", None), getattr(x, "predicted_helpfulness", None)
        if x.measured_safety is not None and pred_s is not None and x.kind == "+":
            ax.annotate("", (x.measured_helpfulness, x.measured_safety), (pred_h, pred_s),
                        arrowprops=dict(arrowstyle="->", color="grey"))
            ax.scatter([pred_h], [pred_s], marker="s", facecolors="none", edgecolors="grey", s=40)
    front = sorted((x for x in candidates if x.pareto), key=lambda x: x.helpfulness)
    ax.plot([x.helpfulness for x in front], [x.safety for x in front], color="green", lw=1.5, label="Pareto front")
    ax.set_xlabel("helpfulness: compliance on benign")
    ax.set_ylabel("safety: refusal on harmful")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Safety / helpfulness trade-off (grey: prediction -> measurement)")
    # labelled: runs and exact combinations, and predictions on the front; one label per place
    shown = [{"name": x.name, "safety": x.safety, "helpfulness": x.helpfulness} for x in candidates
             if getattr(x, "source", "measured") != "predicted" or x.pareto]
    place_labels(ax, [(g[0]["helpfulness"], g[0]["safety"], names_label([p["name"] for p in g]))
                      for g in coincident(shown)], fontsize=7)
    return _save(fig, path)


# --- the study's figures (experiments/study.py) ------------------------------------------------

import math  # noqa: E402

LABEL_COLOURS = {"safety shift": "#d35400", "harmfulness discrimination": "#27ae60", "both": "#8e44ad",
                 "neither": "#7f8c8d", "weakening": "#c0392b", "over-refusal": "#e67e22", "unresolved": "#bdc3c7",
                 "baseline": "black"}
KIND_MARKERS = {"baseline": "*", "single": "o", "+": "s", "|": "^", "&": "v", "~": "D"}


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, float)))


def _logit(p):
    p = np.clip(np.asarray(p, float), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def piles_up(p: np.ndarray, edge: float = 0.02, share: float = 0.5) -> bool:
    """True when most probabilities sit within ``edge`` of 0 or 1 (a histogram of p would show two spikes)."""
    p = np.asarray(p, float)
    return len(p) > 0 and float(((p < edge) | (p > 1 - edge)).mean()) >= share


def plot_defense_distributions(baseline: ScoreTable, tables: dict[str, ScoreTable], labels: dict[str, str],
                               path: str | os.PathLike, *, ncols: int = 4, scale: str = "auto") -> Path:
    """The paper's picture of each defense: harmful and benign refusal scores under the defense
    (filled) against the baseline (outlined), one panel per condition, the mechanism label in
    each title. ``scale`` "auto" uses the refusal margin (logit; P(refuse) on the top axis) when
    probabilities pile up at 0 or 1, else P(refuse)."""
    allp = np.concatenate([baseline.p_refuse.numpy()] + [t.p_refuse.numpy() for t in tables.values()])
    if scale == "auto":
        scale = "margin" if piles_up(allp) else "p_refuse"
    if scale not in ("margin", "p_refuse"):
        raise InputError(f"scale must be 'auto', 'margin' or 'p_refuse', got {scale!r}")

    def values(t):
        return t.margin.numpy().astype(float) if scale == "margin" else t.p_refuse.numpy().astype(float)

    allv = np.concatenate([values(baseline)] + [values(t) for t in tables.values()])
    if scale == "margin":
        lo, hi = float(np.min(allv)), float(np.max(allv))
        pad = 0.05 * (hi - lo) + 1e-6
        bins = np.linspace(lo - pad, hi + pad, 31)
    else:
        bins = np.linspace(0, 1, 26)
    n = max(1, len(tables))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.1 * nrows), squeeze=False)
    lab0 = np.array(baseline.labels)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, table) in zip(axes.flat, tables.items()):
        table = table.select(baseline.ids)
        lab, v, v0 = np.array(table.labels), values(table), values(baseline)
        for cls, colour in (("harmful", HARMFUL), ("benign", BENIGN)):
            sel, sel0 = v[lab == cls], v0[lab0 == cls]
            if len(sel0):
                ax.hist(sel0, bins=bins, histtype="step", color=colour, lw=1.4, ls="--")
                ax.axvline(sel0.mean(), color=colour, lw=1, ls="--")
            if len(sel):
                ax.hist(sel, bins=bins, alpha=0.45, color=colour)
                ax.axvline(sel.mean(), color=colour, lw=2)
        ax.axvline(0.0 if scale == "margin" else 0.5, color="grey", ls=":", lw=1)
        ax.set_title(f"{name}\n{labels.get(name, '')}", fontsize=9)
        ax.set_xlabel("refusal margin (logit)" if scale == "margin" else "P(refuse)", fontsize=8)
        if scale == "margin":
            top = ax.secondary_xaxis("top", functions=(_sigmoid, _logit))
            top.set_xticks([0.01, 0.1, 0.5, 0.9, 0.99])
            top.tick_params(labelsize=6)
    for row in axes:
        row[0].set_ylabel("queries")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=HARMFUL, alpha=0.45, label="harmful, defended"),
               Patch(color=BENIGN, alpha=0.45, label="benign, defended"),
               Line2D([], [], color=HARMFUL, ls="--", label="harmful, baseline"),
               Line2D([], [], color=BENIGN, ls="--", label="benign, baseline"),
               Line2D([], [], color="grey", ls=":", label="decision threshold (p = 0.5)")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, -0.04 / nrows - 0.02))
    fig.suptitle("Refusal scores under each defense (filled) against the baseline (dashed); vertical lines: means"
                 + ("; top axis: P(refuse)" if scale == "margin" else ""), y=1.0 + 0.02 / nrows, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def plot_mechanism_map(rows: list[dict], path: str | os.PathLike) -> Path:
    """Every defense and ensemble on one map of the figures its mechanism label reads (margin
    changes in baseline SDs, docs/analysis.md): the common shift (harmful + benign) / 2 (x)
    against the differential harmful - benign (y), with 95% intervals; colour = label, marker =
    kind (single, a+b, a|b ...). Two dotted lines mark where each class is unchanged (harmful:
    y = -2x; benign: y = 2x), so the label's regions are read off the map: above 0 discrimination
    grew, below it over-refusal, left of "harmful unchanged" weakening, right of "benign
    unchanged" benign queries refuse more."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    pts = [r for r in rows if r.get("kind") != "baseline" and _finite(r.get("shift_sd"))
           and _finite(r.get("differential_sd"))]
    for r in pts:
        x, y = r["shift_sd"], r["differential_sd"]
        xerr = [[x - r["shift_sd_lo"]], [r["shift_sd_hi"] - x]] \
            if _finite(r.get("shift_sd_lo")) and _finite(r.get("shift_sd_hi")) else None
        yerr = [[y - r["differential_sd_lo"]], [r["differential_sd_hi"] - y]] \
            if _finite(r.get("differential_sd_lo")) and _finite(r.get("differential_sd_hi")) else None
        colour = LABEL_COLOURS.get(r["label"], "#34495e")
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=KIND_MARKERS.get(r["kind"], "o"), color=colour, ms=8,
                    ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.9)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    # where a class is unchanged: harmful change = x + y/2 = 0, benign change = x - y/2 = 0
    ax.margins(0.12)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    xs = np.array([x0, x1])
    for slope, text in ((-2.0, "harmful unchanged"), (2.0, "benign unchanged")):
        ax.plot(xs, slope * xs, color="#999", ls=":", lw=1)
        ye = y1 if slope > 0 else y0  # label where the line leaves the plot, inside the axes
        xe = float(np.clip(ye / slope, x0, x1))
        ax.annotate(text, (xe, slope * xe), fontsize=7, color="#777", ha="right" if xe > (x0 + x1) / 2 else "left",
                    va="top" if slope > 0 else "bottom", xytext=(-3 if xe > (x0 + x1) / 2 else 3, 0),
                    textcoords="offset points")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("common shift: (harmful + benign) / 2 margin change, baseline SDs")
    ax.set_ylabel("differential: harmful - benign margin change, baseline SDs")
    from matplotlib.lines import Line2D

    labels_seen = list(dict.fromkeys(r["label"] for r in pts))
    kinds_seen = list(dict.fromkeys(r["kind"] for r in pts))
    handles = [Line2D([], [], ls="", marker="o", color=LABEL_COLOURS.get(lab, "#34495e"), label=lab)
               for lab in labels_seen]
    handles += [Line2D([], [], ls="", marker=KIND_MARKERS.get(k, "o"), color="#555", label=f"kind: {k}")
                for k in kinds_seen]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="label / kind")
    ax.set_title("Mechanism map: the figures the label reads (safety shift right, discrimination up)", fontsize=8)
    place_labels(ax, [(r["shift_sd"], r["differential_sd"], r["condition"]) for r in pts], fontsize=7)
    return _save(fig, path)


def coincident(points: list[dict], digits: int = 9) -> list[list[dict]]:
    """``points`` grouped by where they sit (safety, helpfulness), in first-seen order: on a small
    benchmark many pairs predict the very same rates, and one label serves them all."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((round(p["safety"], digits), round(p["helpfulness"], digits)), []).append(p)
    return list(groups.values())


def names_label(names: list[str], shown: int = 3) -> str:
    """"a, b, c +4 more": a point's label when several conditions share it."""
    return ", ".join(names[:shown]) + (f" +{len(names) - shown} more" if len(names) > shown else "")


def plot_tradeoff_points(points: list[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Safety (refusal on harmful) against helpfulness (compliance on benign): measured points
    filled, predicted ensembles hollow, the Pareto front of the measured points (solid) and of all
    points, predictions included (dashed). A superseded prediction (a run pair's, see
    `experiments.study.tradeoff_points`) is grey, with an arrow to its measurement.

    Read at a glance with many pairs: every measured point is labelled, points at the same place
    share one label (`coincident`), and a predicted point is labelled only on the front with
    predictions, where it would change a choice; the rest are in ``tables/tradeoff.csv``."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colours = {"baseline": "black", "single": "#34495e", "+": "#d35400", "|": "#8e44ad", "&": "#16a085",
               "~": "#2c3e50"}
    runs = {p["name"]: p for p in points if p["measured"]}
    for p in points:
        c, m = colours.get(p["kind"], "#34495e"), KIND_MARKERS.get(p["kind"], "o")
        if p["measured"]:
            ax.scatter(p["helpfulness"], p["safety"], marker=m, color=c, s=70, zorder=3)
        elif p.get("superseded"):
            ax.scatter(p["helpfulness"], p["safety"], marker=m, facecolors="none", edgecolors="grey", s=50, zorder=2)
            run = runs.get(p["name"])
            if run is not None:
                ax.annotate("", (run["helpfulness"], run["safety"]), (p["helpfulness"], p["safety"]),
                            arrowprops=dict(arrowstyle="->", color="grey"))
        else:
            ax.scatter(p["helpfulness"], p["safety"], marker=m, facecolors="none", edgecolors=c, s=40, zorder=2,
                       alpha=0.6 if not p.get("pareto_all") else 1.0)
    labels = []
    for group in coincident([p for p in points if not p.get("superseded")]):
        measured = [p["name"] for p in group if p["measured"]]
        predicted = [p["name"] for p in group if not p["measured"] and p.get("pareto_all")]
        if not measured and not predicted:
            continue
        if measured:
            text = names_label(measured) + (f" (+{len(predicted)} pred.)" if predicted else "")
        else:
            text = (f"{predicted[0]} (pred.)" if len(predicted) == 1
                    else f"{len(predicted)} predicted pairs: {names_label(predicted, 1)}")
        labels.append((group[0]["helpfulness"], group[0]["safety"], text))
    for group, style in (("measured", "-"), ("all", "--")):
        front = sorted((p for p in points if p.get(f"pareto_{group}")), key=lambda p: p["helpfulness"])
        if front:
            ax.plot([p["helpfulness"] for p in front], [p["safety"] for p in front], color="green", ls=style, lw=1.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=KIND_MARKERS.get(k, "o"), color=colours.get(k, "#34495e"),
                      label={"baseline": "baseline", "single": "single defense"}.get(k, f"a{k}b"))
               for k in dict.fromkeys(p["kind"] for p in points)]
    handles += [Line2D([], [], ls="", marker="o", color="#555", label="measured (filled)"),
                Line2D([], [], ls="", marker="o", markerfacecolor="none", color="#555", label="predicted (hollow)"),
                Line2D([], [], color="green", ls="-", label="Pareto front, measured"),
                Line2D([], [], color="green", ls="--", label="Pareto front, with predictions")]
    if any(p.get("superseded") for p in points):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", color="grey",
                              label="run pair's prediction -> measurement"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("helpfulness: compliance on benign")
    ax.set_ylabel("safety: refusal on harmful")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or "Safety / helpfulness trade-off", fontsize=9)
    place_labels(ax, labels)
    return _save(fig, path)


def place_labels(ax, labels: list[tuple[float, float, str]], fontsize: float = 6.5, tries: int = 16) -> None:
    """Annotate each ``(x, y, text)`` beside its point without covering a label placed before it,
    another labelled point's marker, or leaving the axes: a label that would is moved a line at a
    time (down in the upper half, up in the lower), with a thin leader line back to its point; if
    no place is free it stays beside its point. Labels in the right 40% of the axes run leftwards,
    clear of a legend on the right. Call it after everything else is drawn: it reads the axes'
    final limits."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_axes = ax.transAxes.inverted()
    # every labelled point's marker as a box in display pixels (markers are drawn about 6-8 pt
    # wide): a label on another point's marker reads as that point's label
    radius = 5.0 * ax.figure.dpi / 72
    markers = {}
    for x, y, text in labels:
        px, py = ax.transData.transform((x, y))
        markers.setdefault(text, []).append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))

    def note(x, y, text, step, right):
        return ax.annotate(text, (x, y), xytext=(-4 if right else 4, 3 + 9 * step), textcoords="offset points",
                           fontsize=fontsize, ha="right" if right else "left",
                           arrowprops=dict(arrowstyle="-", color="#999", lw=0.5) if step else None)

    placed = []
    for x, y, text in sorted(labels, key=lambda t: (-t[1], t[0])):
        fx, fy = to_axes.transform(ax.transData.transform((x, y)))
        right, away = fx > 0.6, (-1 if fy > 0.5 else 1)
        for k in range(tries):
            label = note(x, y, text, away * k, right)
            label.update_positions(renderer)  # where the offset puts it (else computed at draw time)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            covers = [m for other, boxes in markers.items() if other != text for m in boxes]
            if inside and not any(box.overlaps(b) for b in placed + covers):
                break
            label.remove()
        else:  # nowhere free: beside the point after all
            label = note(x, y, text, 0, right)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)
        placed.append(box)


def plot_layer_grid(profiles: list[LayerProfile], labels: dict[str, str], path: str | os.PathLike) -> Path:
    """Per-layer profile of each condition, one row each (the mechanism label in the row's title):
    AUROC before and after, and the common shift and differential shift in baseline SDs
    (shaded: 95% intervals)."""
    n = max(1, len(profiles))
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.6 * n), squeeze=False)
    for (ax_a, ax_s), p in zip(axes, profiles):
        ax_a.plot(p.layers, p.values["auroc_base"], color="black", ls="--", label="AUROC, baseline")
        ax_a.plot(p.layers, p.values["auroc_def"], color="#2e86c1", marker="o", ms=3, label="AUROC, defended")
        ax_a.fill_between(p.layers, p.lo["auroc_def"], p.hi["auroc_def"], color="#2e86c1", alpha=0.15)
        ax_a.set_ylim(-0.02, 1.02)
        ax_a.axhline(0.5, color="grey", lw=0.6, ls=":")
        for key, colour, lab in (("shift_sd", "#d35400", "common shift (SD)"),
                                 ("differential_sd", "#27ae60", "harmful - benign shift (SD)")):
            ax_s.plot(p.layers, p.values[key], color=colour, marker="o", ms=3, label=lab)
            ax_s.fill_between(p.layers, p.lo[key], p.hi[key], color=colour, alpha=0.15)
        ax_s.axhline(0, color="grey", lw=0.8)
        ax_a.set_title(f"{p.name} — {labels.get(p.name, '')} ({p.score})", fontsize=9)
        ax_s.set_title(f"{p.name}: shift decomposition per layer", fontsize=9)
        for ax in (ax_a, ax_s):
            ax.set_xlabel("layer", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    fig.tight_layout()
    handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8)
    return _save(fig, path)
