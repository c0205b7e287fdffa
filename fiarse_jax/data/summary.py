"""What a partition looks like: per-client sizes and label histograms, as JSON-able
numbers, a short text table and a PNG (to check a federation before training on it)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fiarse_jax.utils import paths


def partition_summary(labels: np.ndarray, parts: Sequence[np.ndarray],
                      num_classes: int) -> dict[str, Any]:
    """Sizes and the [clients, classes] label histogram of ``parts`` (index arrays into
    ``labels``), plus totals; plain Python ints and lists so it can go into JSON."""
    labels = np.asarray(labels)
    hist = np.array([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)
                     for p in parts], dtype=np.int64).reshape(len(parts), -1)
    if hist.shape[1] > num_classes:
        raise ValueError(f"labels reach {hist.shape[1] - 1}, beyond num_classes={num_classes}")
    sizes = hist.sum(1)
    used = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0)
    return {
        "num_clients": len(parts),
        "num_classes": int(num_classes),
        "num_samples": int(len(labels)),
        "sizes": sizes.tolist(),
        "histogram": hist.tolist(),
        "class_totals": hist.sum(0).tolist(),
        "classes_held": (hist > 0).sum(1).tolist(),
        "total_assigned": int(sizes.sum()),
        "unique_assigned": int(len(np.unique(used))),
    }


def format_partition_summary(summary: dict[str, Any], max_clients: int = 10) -> str:
    """A readable table: the first ``max_clients`` clients' label counts, then totals."""
    hist = np.asarray(summary["histogram"], dtype=np.int64).reshape(summary["num_clients"], -1)
    sizes = np.asarray(summary["sizes"])
    c = summary["num_classes"]
    width = max(5, len(str(int(hist.max(initial=0)))) + 1,
                len(str(summary["total_assigned"])) + 1)
    head = "client" + "".join(f"{j:>{width}}" for j in range(c)) + f"{'n':>{width + 1}}" \
        + f"{'#cls':>6}"
    lines = [head, "-" * len(head)]
    for k in range(min(max_clients, len(hist))):
        lines.append(f"{k:>6}" + "".join(f"{v:>{width}}" for v in hist[k])
                     + f"{sizes[k]:>{width + 1}}" + f"{summary['classes_held'][k]:>6}")
    if len(hist) > max_clients:
        lines.append(f"  ... {len(hist) - max_clients} more clients")
    lines.append("-" * len(head))
    lines.append(f"{'total':>6}" + "".join(f"{v:>{width}}" for v in summary["class_totals"])
                 + f"{summary['total_assigned']:>{width + 1}}")
    if len(sizes):
        ncls = np.asarray(summary["classes_held"])
        lines.append(f"{summary['num_clients']} clients, size min/mean/max "
                     f"{sizes.min()}/{sizes.mean():.1f}/{sizes.max()}, classes per client "
                     f"min/mean/max {ncls.min()}/{ncls.mean():.1f}/{ncls.max()}; "
                     f"{summary['unique_assigned']} of {summary['num_samples']} samples assigned"
                     + ("" if summary["unique_assigned"] == summary["total_assigned"]
                        else f" ({summary['total_assigned']} with repeats)"))
    return "\n".join(lines)


def plot_partition(summary: dict[str, Any], path: str, *, title: str | None = None) -> str:
    """Write a PNG of the partition: a stacked bar per client (its label counts, one
    colour per class) above a clients × classes heatmap of label fractions with a
    colorbar. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.asarray(summary["histogram"], dtype=float).reshape(summary["num_clients"], -1)
    k, c = hist.shape
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20" if c <= 20 else "viridis")
    colors = [cmap(j if c <= 20 else j / max(c - 1, 1)) for j in range(c)]
    fig, (ax_bar, ax_map) = plt.subplots(2, 1, figsize=(min(4.0 + 0.12 * k, 20.0), 7.0),
                                         gridspec_kw={"height_ratios": [1.2, 1.0]})
    x = np.arange(k)
    bottom = np.zeros(k)
    for j in range(c):
        ax_bar.bar(x, hist[:, j], 0.85, bottom=bottom, color=colors[j], label=str(j),
                   linewidth=0)
        bottom += hist[:, j]
    ax_bar.set_xlim(-0.5, k - 0.5)
    ax_bar.set_ylabel("samples")
    ax_bar.set_title(title or f"label counts per client ({k} clients, {c} classes)")
    if c <= 20:
        ax_bar.legend(title="class", fontsize=7, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), ncol=1 if c <= 10 else 2)
    frac = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    im = ax_map.imshow(frac.T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
    ax_map.set_xlabel("client")
    ax_map.set_ylabel("class")
    fig.colorbar(im, ax=ax_map, label="fraction of client's samples", pad=0.01)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=150)   # a gs:// path too
    plt.close(fig)
    return path


def federated_summary(data) -> dict[str, Any]:
    """``partition_summary`` of a ``FederatedData``: clients' training rows (padding
    excluded) and, under ``"test"``, their local test samples."""
    y = np.asarray(data.train.y)
    counts = np.asarray(data.train.count)
    flat = np.concatenate([y[i, :counts[i]] for i in range(len(counts))])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    train = partition_summary(flat, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])],
                              data.num_classes)
    owner = np.asarray(data.test_client)
    train["test"] = partition_summary(np.asarray(data.test_y),
                                      [np.flatnonzero(owner == i) for i in range(len(counts))],
                                      data.num_classes)
    return train
