"""Evaluation report: a Markdown table and PNG plots from `metrics.json` content."""

from __future__ import annotations

from typing import Any

from ray_app.storage import join, write_bytes, write_text


def markdown(metrics: dict[str, Any]) -> str:
    """The report: one table per section, each left out when there is nothing for it."""
    k = metrics["k"]
    lines = [f"# Evaluation (k={k})", ""]
    if metrics.get("max_users"):
        lines += [
            f"Each split is a seeded sample of at most {metrics['max_users']} users (the same "
            "users for every method); baselines fit on every training event.",
            "",
        ]
    lines += _split_tables(metrics, k)
    lines += returning_users_tables(metrics)
    for section in (
        _baselines_table,
        _models_table,
        _cold_start_table,
        _lists_table,
        _new_vs_repeat_table,
    ):
        lines += section(metrics, k)
    if metrics.get("paired"):
        lines += ["", "## Paired comparisons", "", *paired_table(metrics)]
    lines += [
        "",
        f"Protocols: sampled = {metrics['protocols']['sampled']}; "
        f"full = {metrics['protocols']['full']}.",
        "",
    ]
    return "\n".join(lines)


def _split_tables(metrics: dict[str, Any], k: int) -> list[str]:
    """Both protocols' metrics of every method on test, then valid."""
    lines: list[str] = []
    for split in ("test", "valid"):
        res = metrics["results"][split]
        lines += [
            f"## {split}",
            "",
            f"| method | sampled HR@{k} | sampled NDCG@{k} | sampled MRR | AUC | full Recall@{k} "
            f"| full NDCG@{k} | coverage@{k} | long-tail@{k} | diversity@{k} | users |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in res.items():
            s, f = r["sampled"], r["full"]
            lines.append(
                f"| {name} | {s[f'hr@{k}']:.4f} | {s[f'ndcg@{k}']:.4f} | {s['mrr']:.4f} "
                f"| {s['auc']:.4f} | {f[f'recall@{k}']:.4f} | {f[f'ndcg@{k}']:.4f} "
                f"| {f[f'coverage@{k}']:.3f} | {f[f'long_tail_share@{k}']:.3f} "
                f"| {f[f'diversity@{k}']:.3f} | {r['users']} |"
            )
        lines.append("")
    return lines


def _baselines_table(metrics: dict[str, Any], k: int) -> list[str]:
    """The baselines' chosen hyper-parameters and their search on valid."""
    lines = [
        "## Baselines",
        "",
        "Hyper-parameters chosen on valid NDCG@k, separately for each protocol.",
        "",
        "| method | fit seconds | chosen (sampled) | chosen (full) | valid NDCG@k sampled / full |",
        "|---|---:|---|---|---|",
    ]
    for name, b in metrics.get("baselines", {}).items():
        chosen = [_short(b["params"][p]) for p in ("sampled", "full")]
        search = "; ".join(
            f"{key}: {v['sampled']:.4f} / {v['full']:.4f}"
            for key, v in b["valid_ndcg_search"].items()
        )
        lines.append(f"| {name} | {b['fit_seconds']} | {chosen[0]} | {chosen[1]} | {search} |")
    return lines


def _models_table(metrics: dict[str, Any], k: int) -> list[str]:
    """The trained models scored, and what each is."""
    if not metrics.get("models"):
        return []
    lines = [
        "",
        "## Trained models",
        "",
        "| name | version | artifact | best epoch | trainable encoder layers | text | IDs |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for name, m in metrics["models"].items():
        lines.append(
            f"| {name} | {m['version']} | {m['artifact']} | {m['best_epoch']} "
            f"| {m['trainable_layers']} | {m['use_text']} | {m['use_ids']} |"
        )
    return lines


def _cold_start_table(metrics: dict[str, Any], k: int) -> list[str]:
    """Held-out items: ranked among each other, beside the warm targets."""
    if not metrics.get("cold_start"):
        return []
    lines = [
        "",
        "## Cold start (items held out of training)",
        "",
        f"Targets that are held-out items, ranked against {metrics['num_negatives']} "
        "other held-out items the user never touched: the valid and test targets, and "
        "every event on a held-out item (train-split ones too, which the model never "
        "trained on), averaged per user. Warm: the same model on the other valid and "
        f"test targets, each against {metrics['num_negatives']} never-touched items "
        "(the sampled protocol); held-out / warm compares the valid + test NDCG.",
        "",
        f"| model | valid + test HR@{k} | NDCG@{k} | users | every event HR@{k} "
        f"| NDCG@{k} | users | events | held-out items | warm NDCG@{k} | users "
        "| held-out / warm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in metrics["cold_start"].items():
        a = r["all_events"]
        vt = (
            f"{r[f'hr@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | {r['users']}"
            if "users" in r
            else "- | - | 0"
        )
        w = r["warm"]
        ratio = (
            f"{r[f'ndcg@{k}'] / w[f'ndcg@{k}']:.2f}" if "users" in r and w[f"ndcg@{k}"] > 0 else "-"
        )
        lines.append(
            f"| {name} | {vt} | {a[f'hr@{k}']:.4f} | {a[f'ndcg@{k}']:.4f} | {a['users']} "
            f"| {a['events']} | {r['held_out_items']} | {w[f'ndcg@{k}']:.4f} "
            f"| {w['users']} | {ratio} |"
        )
    return lines


def _lists_table(metrics: dict[str, Any], k: int) -> list[str]:
    """Precomputed nightly lists scored as of a split."""
    if not metrics.get("lists"):
        return []
    lines = [
        "",
        "## Precomputed top-K lists (nightly, as of a split)",
        "",
        "Lists a `nightly` run made as of a split: each user as the night before their "
        "target. Their target in the top k or not (the nightly backtest table above holds "
        "their NDCG beside every method's), and what the lists look like. A list holds "
        "only items new to the user, so a repeat target is never in it; 'new targets' "
        "leaves those out.",
        "",
        f"| lists | split | full Recall@{k} | full NDCG@{k} | new targets NDCG@{k} "
        f"| coverage@{k} "
        f"| long-tail@{k} | diversity@{k} | candidates | diversity w | tail boost "
        "| users with a list |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in metrics["lists"].items():
        f, c = r["full"], r["config"]
        lines.append(
            f"| {name} | {r['split']} | {f[f'recall@{k}']:.4f} | {f[f'ndcg@{k}']:.4f} "
            f"| {r['new_targets'][f'ndcg@{k}']:.4f} ({r['new_targets']['users']}) "
            f"| {f[f'coverage@{k}']:.3f} | {f[f'long_tail_share@{k}']:.3f} "
            f"| {f[f'diversity@{k}']:.3f} | {c['num_candidates'] or 'all'} "
            f"| {c['diversity']} | {c['long_tail_boost']} "
            f"| {r['users_with_list']} / {r['users']} |"
        )
    return lines


def _new_vs_repeat_table(metrics: dict[str, Any], k: int) -> list[str]:
    """Full ranking on test, targets new to the user apart from repeats."""
    by_target = {n: d["full_by_target"] for n, d in metrics.get("breakdowns_test", {}).items()}
    if not any(b["repeat"]["users"] for b in by_target.values()):
        return []
    lines = [
        "",
        "## Test, full ranking: targets new to the user vs repeats",
        "",
        f"| method | new Recall@{k} | new NDCG@{k} | repeat Recall@{k} "
        f"| repeat NDCG@{k} | new / repeat users |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, b in by_target.items():
        new, rep = b["new"], b["repeat"]
        lines.append(
            f"| {name} | {new[f'recall@{k}']:.4f} | {new[f'ndcg@{k}']:.4f} "
            f"| {rep[f'recall@{k}']:.4f} | {rep[f'ndcg@{k}']:.4f} "
            f"| {new['users']} / {rep['users']} |"
        )
    return lines


def _ndcg_cell(cell: dict[str, Any] | None, k: int) -> str:
    if not cell:
        return "-"
    sd = cell.get(f"ndcg@{k}_sd")
    return f"{cell[f'ndcg@{k}']:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def _interval(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def returning_users_tables(metrics: dict[str, Any]) -> list[str]:
    """The test split at every moment of scoring, by real gap, in the nightly backtest,
    and each model against the best baseline of every column."""
    k = metrics["k"]
    mom = metrics.get("moments")
    if not mom:
        return []
    moments = ["target", *mom["deltas_s"]]
    return [
        *_moments_table(mom, moments, k),
        *_gaps_table(metrics.get("breakdowns_test", {}), k),
        *_backtest_table(metrics.get("backtest", {}).get("test"), k),
        *_versus_best_table(metrics.get("versus_best_baseline", {}), moments, k),
    ]


def _moments_table(mom: dict[str, Any], moments: list[str], k: int) -> list[str]:
    test = mom["results"]["test"]
    head = " | ".join(moments)
    lines = [
        f"## Returning users: test NDCG@{k} by the moment of scoring",
        "",
        "The same targets, histories and candidates, scored at the target's own time "
        "(`target`) and at the history's last event + Δ. Methods without a time input "
        f"score the same at every moment. Targets without an earlier event (scored at "
        f"their own time): {mom['no_earlier_event']['test']}.",
        "",
    ]
    for proto in ("full", "sampled"):
        lines += [
            f"**{proto}**",
            "",
            f"| method | {head} |",
            "|---|" + "---:|" * len(moments),
        ]
        for name, row in test.items():
            if not row:
                continue
            cells = [_ndcg_cell(row.get(m, {}).get(proto), k) for m in moments]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _gaps_table(details: dict[str, Any], k: int) -> list[str]:
    gaps = {n: d.get("full_ndcg_by_gap", {}) for n, d in details.items()}
    labels = list(next(iter(gaps.values()), {}))
    if not labels:
        return []
    counts = next(iter(gaps.values()))
    lines = [
        f"## Test NDCG@{k} at the target's time, by the real gap to the target",
        "",
        "The gap from the history's last event to the target: the real returning users. "
        "Cells: full / sampled.",
        "",
        "| method | " + " | ".join(f"{g} ({counts[g]['users']})" for g in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name, d in details.items():
        full, samp = d["full_ndcg_by_gap"], d["sampled_ndcg_by_gap"]
        cells = [
            f"{full[g]['ndcg']:.4f} / {samp[g]['ndcg']:.4f}" if g in full else "-" for g in labels
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _backtest_table(bt: dict[str, Any] | None, k: int) -> list[str]:
    if not bt:
        return []
    first = next(iter(bt.values()))
    lines = [
        "## Nightly backtest (test)",
        "",
        "Each target against the list the nightly run of the UTC day before it made: "
        "events before the target's day, recency to the end of the day before, the whole "
        "catalogue minus those events' items (a repeat target is a miss). Baselines give "
        "users with an empty history the popularity list.",
        "",
        f"| method | Recall@{k} | NDCG@{k} | with history NDCG@{k} "
        f"({first['with_history']['users']}) | empty history NDCG@{k} "
        f"({first['empty_history']['users']}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in bt.items():
        a, w, e = r["all"], r["with_history"], r["empty_history"]
        lines.append(
            f"| {name} | {a[f'recall@{k}']:.4f} | {a[f'ndcg@{k}']:.4f} "
            f"| {w[f'ndcg@{k}']:.4f} | {e[f'ndcg@{k}']:.4f} |"
        )
    lines.append("")
    return lines


def _versus_best_table(vs: dict[str, Any], moments: list[str], k: int) -> list[str]:
    if not vs:
        return []
    cols = [f"{p}@{m}" for p in ("full", "sampled") for m in moments] + ["backtest"]
    cols = [c for c in cols if any(c in r for r in vs.values())]
    names = list(vs)
    lines = [
        f"## Against the best baseline of each column (test NDCG@{k})",
        "",
        "Each model minus the baseline with the highest test value in that column, user "
        "by user: mean [95% interval]. An interval that holds 0 is no difference.",
        "",
        "| column | best baseline | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for c in cols:
        best = next(r[c]["baseline"] for r in vs.values() if c in r)
        cells = [_interval(vs[n][c]) if c in vs[n] else "-" for n in names]
        lines.append(f"| {c} | {best} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def paired_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines of the paired a - b comparisons in `metrics["paired"]`."""
    k = metrics["k"]
    lines = [
        f"a - b in NDCG@{k}, user by user on the same lists: mean ± standard error "
        "(users). Within about two standard errors is noise.",
        "",
        "| a - b | test, sampled | test, full | cold start, valid + test "
        "| cold start, every event |",
        "|---|---:|---:|---:|---:|",
    ]
    for pair, r in metrics.get("paired", {}).items():
        cells = [
            f"{r[c]['diff']:+.4f} ± {r[c]['se']:.4f} ({r[c]['users']})" if c in r else "-"
            for c in ("test_sampled", "test_full", "cold_start", "cold_start_all")
        ]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines


def _short(params: dict) -> str:
    keep = {k: v for k, v in params.items() if k in ("k", "lam", "epochs_trained")}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"


def write_report(out_dir: str, metrics: dict[str, Any]) -> list[str]:
    """`report.md` and PNG plots under `out_dir` (local or URI); returns the plot names."""
    from ray_app import plots

    write_text(join(out_dir, "report.md"), markdown(metrics))
    figures = {"metrics_by_method.png": plots.metrics_by_method(metrics)}
    if metrics.get("moments"):
        figures["ndcg_by_delta.png"] = plots.ndcg_by_moment(metrics)
    if metrics.get("headline") and metrics["headline"]["segments"]["all"]["ndcg"]:
        figures["headline.png"] = plots.headline(metrics)
    for key in plots.BREAKDOWNS:
        figures[f"{key}.png"] = plots.ndcg_breakdown(metrics, key)
    for name, fig in figures.items():
        write_bytes(join(out_dir, name), plots.save_png(fig))
    return list(figures)


SEGMENTS = {
    "all": "all targets",
    "new_items": "new items",
    "returning_users": "returning users",
}


def headline_text(metrics: dict[str, Any]) -> str:
    """The evaluation in a few plain lines (what `rerank demo` ends with): each method's
    NDCG@k on test, overall, on new items and for returning users, then each trained
    model minus each baseline with its 95% interval, and a verdict per segment."""
    head = metrics.get("headline")
    if not head or not head["segments"]["all"]["ndcg"]:
        return ""
    k, segs = head["k"], head["segments"]
    names = list(segs["all"]["ndcg"])
    width = max(len(n) for n in names) + 2
    cols = [f"{SEGMENTS[s]} ({segs[s]['targets']})" for s in SEGMENTS]
    lines = [
        f"Test split, whole-catalogue ranking, NDCG@{k} (targets in brackets):",
        "",
        " " * width + "".join(f"{c:>26}" for c in cols),
    ]
    for n in names:
        cells = []
        for s in SEGMENTS:
            v = segs[s]["ndcg"].get(n)
            cells.append(f"{v:>26.4f}" if v is not None and v == v else f"{'-':>26}")
        lines.append(f"{n:<{width}}" + "".join(cells))
    pairs = list(segs["all"]["versus"])
    if pairs:
        lines += ["", "Difference, user by user, with its 95% interval:", ""]
        pw = max(len(p) for p in pairs) + 2
        for p in pairs:
            cells = []
            for s in SEGMENTS:
                d = segs[s]["versus"].get(p)
                if d is None or d["users"] < 2:
                    cells.append(f"{'-':>26}")
                else:
                    lo, hi = d["ci95"]
                    cells.append(f"{d['diff']:>+8.4f} [{lo:+.4f}, {hi:+.4f}]".rjust(26))
            lines.append(f"{p:<{pw}}" + "".join(cells))
        lines += ["", *_verdicts(segs, pairs)]
    return "\n".join(lines)


def _verdicts(segs: dict[str, Any], pairs: list[str]) -> list[str]:
    out = []
    for s, label in SEGMENTS.items():
        ahead, behind, unclear = [], [], []
        for p in pairs:
            d = segs[s]["versus"].get(p)
            if d is None or d["users"] < 2:
                continue
            lo, hi = d["ci95"]
            baseline = p.split(" - ", 1)[1]
            (ahead if lo > 0 else behind if hi < 0 else unclear).append(baseline)
        model = pairs[0].split(" - ", 1)[0]
        parts = []
        if ahead:
            parts.append(f"ahead of {', '.join(ahead)}")
        if unclear:
            parts.append(f"not separable from {', '.join(unclear)}")
        if behind:
            parts.append(f"behind {', '.join(behind)}")
        if parts:
            out.append(f"{label}: {model} is " + "; ".join(parts) + ".")
    return out
