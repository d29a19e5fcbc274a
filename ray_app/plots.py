"""Every figure the project draws, as functions that return a matplotlib Figure.

The stages save them as PNGs next to their outputs (training curves in the
model artifact, evaluation plots in the report); the notebooks show the same
figures inline. Keeping them here means a notebook never re-implements a plot.
matplotlib is imported inside the functions so that importing this module
costs nothing for the stages that do not draw.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    if not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interactive() -> bool:
    """True inside IPython/Jupyter, where the inline backend must be kept."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def training_curves(history: list[dict[str, Any]]) -> Figure:
    """Loss and validation metrics per epoch (a training run's `metrics.json` history)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.5))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set_title("training loss")
    # Full-ranking NDCG is an order of magnitude below the sampled metrics:
    # on a shared axis its curve would look flat.
    for key in [k for k in history[0] if k.startswith("valid_")] if history else []:
        ax = c if "full" in key else b
        ax.plot(epochs, [h[key] for h in history], marker="o", label=key.removeprefix("valid_"))
    b.set_title("validation, sampled candidates")
    c.set_title("validation, full ranking")
    for ax in (a, b, c):
        ax.set_xlabel("epoch")
    for ax in (b, c):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def metrics_by_method(metrics: dict[str, Any], split: str = "test") -> Figure:
    """Bars of HR/NDCG (sampled) and Recall/NDCG (full ranking) for every method."""
    plt = _pyplot()
    k = metrics["k"]
    res = metrics["results"][split]
    names = list(res)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, proto, metric_names in (
        (axes[0], "sampled", [f"hr@{k}", f"ndcg@{k}"]),
        (axes[1], "full", [f"recall@{k}", f"ndcg@{k}"]),
    ):
        width = 0.8 / len(metric_names)
        top = 0.0
        for j, m in enumerate(metric_names):
            vals = [res[n][proto][m] for n in names]
            bars = ax.bar([i + j * width for i in range(len(names))], vals, width, label=m)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
            top = max(top, *vals)
        ax.set_xticks([i + width * (len(metric_names) - 1) / 2 for i in range(len(names))], names)
        ax.set_ylim(0, top * 1.2 or 1)  # room for the legend above the bars
        ax.set_title(f"{split}, {proto} protocol")
        ax.legend(loc="upper left", ncols=2, fontsize=8)
    fig.tight_layout()
    return fig


def headline(metrics: dict[str, Any]) -> Figure:
    """NDCG@k of every method on all test targets, on new items and for returning users:
    the demo's summary as bars (its intervals are in the text beside it)."""
    plt = _pyplot()
    head = metrics["headline"]
    segs = head["segments"]
    labels = {"all": "all targets", "new_items": "new items", "returning_users": "returning users"}
    names = list(segs["all"]["ndcg"])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        vals = [segs[s]["ndcg"].get(n, float("nan")) for s in labels]
        bars = ax.bar([i + j * width for i in range(len(labels))], vals, width, label=n)
        ax.bar_label(bars, fmt="%.3f", fontsize=6)
    ax.set_xticks(
        [i + width * (len(names) - 1) / 2 for i in range(len(labels))],
        [f"{labels[s]} ({segs[s]['targets']})" for s in labels],
    )
    ax.set_ylabel(f"NDCG@{head['k']} (whole catalogue)")
    ax.set_title("test split: every method, overall, on new items and for returning users")
    ax.legend(fontsize=7, ncols=4)
    fig.tight_layout()
    return fig


BREAKDOWNS = {
    "ndcg_by_history": "history length (events before target)",
    "ndcg_by_popularity": "target item popularity (train count rank)",
    "ndcg_by_gap": "real gap from the last event to the target",
}


def ndcg_by_moment(metrics: dict[str, Any], split: str = "test") -> Figure:
    """NDCG@k against the moment of scoring (the target's time, then the history's last
    event + Δ), one line per method, both protocols: what a returning user gets. Methods
    without a time input draw flat lines."""
    plt = _pyplot()
    k = metrics["k"]
    mom = metrics["moments"]
    moments = ["target", *mom["deltas_s"]]
    table = mom["results"][split]
    names = [n for n, row in table.items() if row]
    colors = plt.get_cmap("tab20")(range(len(names)))
    groups = set(metrics.get("groups", {}))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, proto in zip(axes, ("full", "sampled"), strict=True):
        for name, color in zip(names, colors, strict=True):
            row = table[name]
            ys = [row.get(m, {}).get(proto, {}).get(f"ndcg@{k}", float("nan")) for m in moments]
            timed = mom["uses_time"].get(name, True)
            ax.plot(
                range(len(moments)),
                ys,
                "-" if timed else "--",
                marker="o" if timed else None,
                lw=2.5 if name in groups else 1.2,
                color=color,
                label=name + ("" if timed else " (no time input)"),
            )
        ax.set_xticks(range(len(moments)), moments, fontsize=8)
        ax.set_xlabel("moment of scoring (target's time, then last event + Δ)")
        ax.set_title(f"{split} NDCG@{k}, {proto}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return fig


def ndcg_breakdown(metrics: dict[str, Any], key: str = "ndcg_by_popularity") -> Figure:
    """Test NDCG@k of every method per bucket of `key` (see BREAKDOWNS), both protocols."""
    plt = _pyplot()
    k = metrics["k"]
    title = BREAKDOWNS[key]
    names = list(metrics["results"]["test"])
    details = metrics.get("breakdowns_test", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, proto in zip(axes, ("full", "sampled"), strict=True):
        for n in names:
            d = details.get(n, {}).get(f"{proto}_{key}", {})
            ax.plot(list(d), [v["ndcg"] for v in d.values()], marker="o", label=n)
        if names and details.get(names[0]):
            d0 = details[names[0]][f"{proto}_{key}"]
            ax.set_xticks(
                range(len(d0)), [f"{b}\n(n={v['users']})" for b, v in d0.items()], fontsize=7
            )
        ax.set_title(f"test NDCG@{k} by {title.split(' (')[0]}, {proto}")
        ax.set_xlabel(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def history_and_ranking(
    history: Sequence[str],
    ranked: Sequence[tuple[str, float]],
    title: str = "",
    width: int = 64,
) -> Figure:
    """A user's recent items (oldest at the top) beside the list the model made
    for them, with each item's score as a bar: what a person checks first when
    asking whether the re-ranker's choices make sense for that user."""
    plt = _pyplot()
    rows = max(len(history), len(ranked), 1)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.32 * rows + 1.2), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    left.axis("off")
    left.set_title("history (oldest first)", loc="left", fontsize=10)
    for i, name in enumerate(history):
        left.text(0, 1 - (i + 0.5) / rows, textwrap.shorten(name, width), fontsize=8, va="center")
    labels = [f"{i + 1}. {textwrap.shorten(n, width)}" for i, (n, _) in enumerate(ranked)]
    scores = [s for _, s in ranked]
    right.barh(range(len(ranked)), scores, color="tab:blue")
    right.set_yticks(range(len(ranked)), labels, fontsize=8)
    right.set_ylim(rows - 0.5, -0.5)
    right.set_xlabel("score")
    right.set_title("re-ranked list (best first)", loc="left", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (closed afterwards), for writing to any storage."""
    import io

    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def paired_differences(metrics: dict[str, Any]) -> Figure:
    """Each configured pair's NDCG@k difference (a - b, user by user) with a 95%
    interval (±1.96 standard errors): an interval clear of zero is a real difference."""
    plt = _pyplot()
    k = metrics["k"]
    pairs = metrics.get("paired", {})
    columns = [
        c
        for c in ("test_sampled", "test_full", "cold_start", "cold_start_all")
        if any(c in r for r in pairs.values())
    ]
    fig, axes = plt.subplots(
        1, max(len(columns), 1), figsize=(4.2 * max(len(columns), 1), 0.5 * len(pairs) + 1.6)
    )
    axes = axes if len(columns) > 1 else [axes]
    names = list(pairs)
    for ax, col in zip(axes, columns, strict=False):
        diffs = [pairs[n][col]["diff"] if col in pairs[n] else float("nan") for n in names]
        errs = [1.96 * pairs[n][col]["se"] if col in pairs[n] else 0.0 for n in names]
        colors = [
            "tab:green" if d - e > 0 else "tab:red" if d + e < 0 else "tab:gray"
            for d, e in zip(diffs, errs, strict=True)
        ]
        ax.barh(range(len(names)), diffs, xerr=errs, color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{col.replace('_', ', ', 1)}: NDCG@{k} a - b", fontsize=9)
    if not columns:
        axes[0].text(0.5, 0.5, "no pairs configured", ha="center")
        axes[0].axis("off")
    fig.tight_layout()
    return fig
