"""How far `explain` can be trusted: remove the history item an explanation names first,
then a random other one, and see which lowers the explained item's score more.

    python jobs/explain_faithfulness.py --model runs/movielens/model \\
        --prepared runs/movielens/prepared

For every test user with at least 2 distinct items in the history the model reads,
scored at the target's moment: rank the catalogue (items already in the history
left out), take the top 10, and for each of them
- remove every event of its top-weighted history item and re-score it;
- remove every event of one other history item, drawn with a fixed seed, and
  re-score it.
If the weights were faithful, the first removal would lower the score more. Prints
the mean drops and their paired difference with a 95% interval (over users: a
user's items share one history, so they are not independent cases), the share of
cases where the top-weighted item's removal drops the score more, and how often
the item would then leave the user's top list (the catalogue re-ranked without the
removed item); the last line is the same as one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch

from ray_app.model.artifact import load_artifact
from ray_app.model.history import make_history
from ray_app.model.ranker import attention_by_item
from ray_app.protocol.data import load_prepared

logger = logging.getLogger("explain_faithfulness")


def _without(t, row: int, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = t.histories[row] != item
    return t.histories[row][keep], t.history_events[row][keep], t.history_times[row][keep]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model artifact (train's output)")
    p.add_argument("--prepared", required=True, help="the prepare output it was trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--top", type=int, default=10, help="explained items per user")
    p.add_argument("--max-users", type=int, default=0, help="0: every eligible user")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_grad_enabled(False)

    art = load_artifact(args.model)
    model, vectors = art.model.eval(), art.item_vectors
    length = model.cfg.max_history
    t = load_prepared(args.prepared).splits[args.split]
    rng = np.random.default_rng(args.seed)
    rows = [r for r in range(len(t)) if len(np.unique(t.histories[r][-length:])) >= 2]
    if args.max_users:
        rows = rows[: args.max_users]
    drops_top, drops_random, weights, per_user, out_of_top = [], [], [], [], []
    gaps: list[float] = []
    named_last: list[bool] = []
    t0 = time.perf_counter()
    for n, r in enumerate(rows):
        moment = np.asarray([t.moments[r]])
        hist = make_history(
            [t.histories[r]], [t.history_events[r]], [t.history_times[r]], moment, length
        )
        scores = model.predict(hist, vectors)[0]
        scores[0] = -torch.inf
        scores[torch.from_numpy(np.unique(t.histories[r]))] = -torch.inf
        top = torch.topk(scores, args.top).indices
        base, att = model.explain(hist, vectors[top])
        gaps.append(float(base[0, 0] - base[0, -1]))
        window = hist.items[0].numpy()
        named = attention_by_item(window, att[0].numpy(), top=1)
        pool = np.unique(window[window > 0])
        removed = []
        for why in named:
            item, weight = why[0]
            others = pool[pool != item]
            removed.append((item, int(rng.choice(others))))
            weights.append(weight)
            named_last.append(item == int(t.histories[r][-1]))
        histories = [_without(t, r, h) for pair in removed for h in pair]
        mod = make_history(
            [h[0] for h in histories],
            [h[1] for h in histories],
            [h[2] for h in histories],
            np.repeat(moment, len(histories)),
            length,
        )
        # The whole catalogue again, as the user's list would be made without the item.
        full = model.predict(mod, vectors)
        full[:, scores == -torch.inf] = -torch.inf
        listed = top.repeat_interleave(2)
        after_all = full.gather(1, listed.unsqueeze(1))
        out_of_top += ((full > after_all).sum(1) >= args.top).view(-1, 2).tolist()
        after = after_all[:, 0].view(-1, 2)
        drop = base[0].unsqueeze(1) - after
        drops_top += drop[:, 0].tolist()
        drops_random += drop[:, 1].tolist()
        per_user.append(float((drop[:, 0] - drop[:, 1]).mean()))
        if (n + 1) % 100 == 0:
            logger.info("%d/%d users, %.0f s", n + 1, len(rows), time.perf_counter() - t0)
    top_d, rand_d = np.asarray(drops_top), np.asarray(drops_random)
    diff = top_d - rand_d
    users = np.asarray(per_user)
    se = users.std(ddof=1) / np.sqrt(len(users))
    out = {
        "model": args.model,
        "split": args.split,
        "users": len(rows),
        "cases": len(diff),
        "mean_top_weight": round(float(np.mean(weights)), 4),
        "share_top_named_is_last_event": round(float(np.mean(named_last)), 4),
        "mean_drop_top_weighted": round(float(top_d.mean()), 4),
        "mean_drop_random_other": round(float(rand_d.mean()), 4),
        "mean_difference": round(float(diff.mean()), 4),
        "difference_95ci": [
            round(float(users.mean() - 1.96 * se), 4),
            round(float(users.mean() + 1.96 * se), 4),
        ],
        "share_top_drops_more": round(float((diff > 0).mean()), 4),
        "share_leaving_top_top_weighted": round(float(np.mean([o[0] for o in out_of_top])), 4),
        "share_leaving_top_random_other": round(float(np.mean([o[1] for o in out_of_top])), 4),
        "median_score_gap_1_to_top": round(float(np.median(gaps)), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"{out['cases']} explained items of {out['users']} users ({args.split}):\n"
        f"  mean weight of the top-named history item  {out['mean_top_weight']:.3f}\n"
        f"  top-named item is the latest event in       "
        f"{out['share_top_named_is_last_event']:.1%}\n"
        f"  score drop, top-named item removed          {out['mean_drop_top_weighted']:+.4f}\n"
        f"  score drop, a random other item removed     {out['mean_drop_random_other']:+.4f}\n"
        f"  difference (95% interval)                   {out['mean_difference']:+.4f} "
        f"[{out['difference_95ci'][0]:+.4f}, {out['difference_95ci'][1]:+.4f}]\n"
        f"  top-named removal drops more in             {out['share_top_drops_more']:.1%}\n"
        f"  item leaves the top {args.top}, top-named removed   "
        f"{out['share_leaving_top_top_weighted']:.1%}\n"
        f"  item leaves the top {args.top}, random removed      "
        f"{out['share_leaving_top_random_other']:.1%}\n"
        f"  (median score gap, 1st to {args.top}th item: {out['median_score_gap_1_to_top']:.3f})"
    )
    print(json.dumps(out, separators=(",", ":")))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
