"""Matplotlib figures for a mapping: UMAP, confusion matrix, per-class F1, confidence."""

from __future__ import annotations

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def palette(n: int) -> list:
    """n distinguishable colours: tab10/tab20 for few classes, tab20+tab20b+tab20c for many."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    cols = [matplotlib.colormaps["tab20"](i) for i in range(20)]
    cols += [matplotlib.colormaps["tab20b"](i) for i in range(20)] + [
        matplotlib.colormaps["tab20c"](i) for i in range(20)
    ]
    if n > len(cols):
        cols += [matplotlib.colormaps["hsv"](i / (n - len(cols))) for i in range(n - len(cols))]
    # interleave dark and light so neighbours in the legend differ
    order = list(range(0, 20, 2)) + list(range(1, 20, 2)) + list(range(20, len(cols)))
    return [cols[i] for i in order][:n]


def umap_embedding(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP (cosine) of vectors; PCA-50 first when the dimension is larger."""
    import umap

    x = vectors
    if x.shape[1] > 50 and x.shape[0] > 50:
        from sklearn.decomposition import PCA

        x = PCA(50, random_state=seed).fit_transform(x)
    n_neighbors = int(min(15, max(2, x.shape[0] - 1)))
    return umap.UMAP(
        n_neighbors=n_neighbors, metric="cosine", random_state=seed, n_jobs=1
    ).fit_transform(x)


def plot_umap(xy_ref, ref_labels, xy_q, q_labels, q_conf, path):
    plt = _mpl()
    classes = sorted(set(map(str, ref_labels)) | set(map(str, q_labels)))
    cols = dict(zip(classes, palette(len(classes))))
    cols["unassigned"] = (0.6, 0.6, 0.6, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5), constrained_layout=True)
    for ax, xy, labels, title in (
        (axes[0], xy_ref, ref_labels, "Reference atlas (labels)"),
        (axes[1], xy_q, q_labels, "Query (predicted labels)"),
    ):
        ax.scatter(xy_ref[:, 0], xy_ref[:, 1], s=3, c="#e6e6e6", linewidths=0)
        for c in classes + ["unassigned"]:
            m = np.asarray(labels).astype(str) == c
            if m.any():
                ax.scatter(
                    xy[m, 0], xy[m, 1], s=6, color=cols[c], label=f"{c} ({m.sum():,})", linewidths=0
                )
        ax.set_title(title, fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels_ = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    seen = {lbl.split(" (")[0] for lbl in labels_}
    for h, lbl in zip(h2, l2):
        if lbl.split(" (")[0] not in seen:
            handles.append(h)
            labels_.append(lbl)
    fig.legend(
        handles,
        [lbl.split(" (")[0] for lbl in labels_],
        loc="outside lower center",
        ncol=min(6, max(1, len(handles))),
        fontsize=10,
        markerscale=2.5,
        frameon=False,
    )
    axes[2].scatter(xy_ref[:, 0], xy_ref[:, 1], s=3, c="#e6e6e6", linewidths=0)
    sc = axes[2].scatter(
        xy_q[:, 0], xy_q[:, 1], s=6, c=q_conf, cmap="viridis", vmin=0, vmax=1, linewidths=0
    )
    fig.colorbar(sc, ax=axes[2], shrink=0.8, label="confidence")
    axes[2].set_title("Query (confidence)", fontsize=13)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(metrics: dict, path):
    plt = _mpl()
    conf = metrics["confusion"]
    m = np.asarray(conf["matrix"], dtype=float)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    t, p = conf["true"], conf["predicted"]
    size = max(6, 0.55 * max(len(t), len(p)) + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(p)), p, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(len(t)), t, fontsize=9)
    for i in range(len(t)):
        for j in range(len(p)):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (colour: fraction of the true class)")
    fig.colorbar(im, ax=ax, shrink=0.7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_per_class_f1(metrics: dict, path):
    plt = _mpl()
    items = sorted(metrics["per_class"].items(), key=lambda kv: -kv[1]["support"])
    names = [f"{k} (n={v['support']:,})" for k, v in items]
    f1 = [v["f1"] for _, v in items]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(items) + 1.5), constrained_layout=True)
    ax.barh(range(len(items)), f1, color=palette(len(items)))
    ax.set_yticks(range(len(items)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    for i, v in enumerate(f1):
        ax.text(min(v + 0.01, 0.93), i, f"{v:.2f}", va="center", fontsize=8)
    ax.set_title(f"Per-class F1 (macro-F1 {metrics['macro_f1']:.3f})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_confidence(conf: np.ndarray, min_confidence: float, path):
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.hist(conf, bins=np.linspace(0, 1, 41), color="#4c72b0")
    if min_confidence > 0:
        ax.axvline(
            min_confidence, color="crimson", ls="--", label=f"--min-confidence {min_confidence:g}"
        )
        ax.legend()
    ax.set_xlabel("confidence (weighted vote share of the winning label)")
    ax.set_ylabel("cells")
    ax.set_title("Confidence of the query cells")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_reliability(conf: np.ndarray, correct: np.ndarray, typicality, path, mixing=None):
    """Left: observed accuracy per confidence bin against the diagonal (a calibrated vote
    lies on it), with the cells per bin. Right: the share of cells whose typicality is at
    most t, against t: for cells of subtypes the atlas knows it should follow the
    diagonal (so --min-typicality t calls about t of them unassigned). With `mixing`
    (map --min-mixing), the same for the mixing p-value, dotted: a binomial tail, so at
    or below the diagonal for cells of known subtypes."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    ax = axes[0]
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(conf, edges) - 1, 0, 9)
    mids, acc, counts = [], [], []
    for b in range(10):
        m = which == b
        if m.any():
            mids.append(conf[m].mean())
            acc.append(correct[m].mean())
            counts.append(int(m.sum()))
    ax.plot([0, 1], [0, 1], ls="--", color="#999", label="perfectly calibrated")
    ax.plot(mids, acc, marker="o", color="#4c72b0", label="observed")
    for x, y, c in zip(mids, acc, counts):
        ax.annotate(
            f"{c:,}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (mean in bin)")
    ax.set_ylabel("share of cells labelled right")
    ax.set_title("Reliability of the confidence (numbers: cells per bin)")
    ax.legend(loc="lower right")
    ax = axes[1]
    grid = np.linspace(0, 1, 101)
    ax.plot([0, 1], [0, 1], ls="--", color="#999", label="calibrated")
    t = None if typicality is None else np.asarray(typicality, dtype=float)
    mix = None if mixing is None else np.asarray(mixing, dtype=float)
    if mix is not None:
        for mask, label, colour in (
            (correct, "mixing, cells labelled right", "#4c72b0"),
            (~correct, "mixing, cells labelled wrong", "crimson"),
        ):
            if mask.any():
                shares = [(mix[mask] <= g).mean() for g in grid]
                ax.plot(grid, shares, label=label, color=colour, ls=":")
    if (t is None or not np.isfinite(t).any()) and mix is None:
        ax.text(
            0.5,
            0.5,
            "no typicality: the atlas has no held-out\ncalibration cells "
            "(atlas build --calibration-split 0.1)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    elif t is not None and np.isfinite(t).any():
        for mask, label, colour in (
            (correct, "cells labelled right", "#4c72b0"),
            (~correct, "cells labelled wrong", "crimson"),
        ):
            if mask.any():
                ax.plot(grid, [(t[mask] <= g).mean() for g in grid], label=label, color=colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("threshold t")
    ax.set_ylabel("share of cells at or below t")
    ax.set_title(
        "Typicality" + (" and mixing" if mix is not None else "") + " calibration (unassigned call)"
    )
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
