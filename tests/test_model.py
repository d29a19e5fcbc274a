"""The re-ranker's parts without Ray: encoder split, towers, masks, checkpoints."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_app.model.config import ModelConfig
from ray_app.model.encoder import TextEncoder, load_pretrained
from ray_app.model.history import History, left_pad, make_history
from ray_app.model.net import RerankerNet
from ray_app.training.batches import (
    ExampleBatch,
    ItemText,
    new_at_moment,
    not_yet_seen,
    step_candidates,
    to_examples,
)
from ray_app.training.checkpoint import load_optimizer, save_optimizer
from ray_app.training.steps import lr_factor


@pytest.fixture(scope="module")
def tiny_bert():
    bert, tok = load_pretrained("tiny", seed=0)
    return bert.eval(), tok


def test_left_pad_keeps_the_last_values_right_aligned():
    col = pa.array([[1, 2, 3], [], [4], [5, 6, 7, 8, 9]])
    out = left_pad(col.slice(1), 3)  # a sliced array keeps its own offsets right
    assert out.tolist() == [[0, 0, 0], [0, 0, 4], [7, 8, 9]]


def test_history_gaps_are_measured_to_the_scoring_time():
    h = make_history(
        [np.array([3, 4]), np.array([5])],
        [np.array([1, 2]), np.array([1])],
        [np.array([100, 160]), np.array([50])],
        [400, 60],
        4,
    )
    # Padded to the longest history given (at most the length asked for).
    assert h.items.tolist() == [[3, 4], [0, 5]]
    assert h.gaps.tolist() == [[300, 240], [0, 10]]
    long = make_history([np.arange(1, 7)], [np.ones(6)], [np.arange(6)], [10], 4)
    assert long.items.tolist() == [[3, 4, 5, 6]]


@pytest.mark.parametrize("trainable", [0, 1, -1])
def test_split_encoder_equals_the_whole_encoder(tiny_bert, trainable):
    bert, tok = tiny_bert
    enc = tok(["a long item title with genres", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * m).sum(1) / m.sum(1)
        got = TextEncoder(bert, trainable).eval()(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_only_the_top_layers_train(tiny_bert):
    bert, _ = load_pretrained("tiny", seed=0)
    te = TextEncoder(bert, 1)
    names = {n for n, p in te.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("bert.encoder.layer.1.") for n in names)
    lora = TextEncoder(load_pretrained("tiny", seed=0)[0], 1, lora_rank=4)
    lnames = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert lnames and all("lora_" in n and ".layer.1." in n for n in lnames)


def test_cached_lower_output_gives_the_same_pooled_text(tiny_bert):
    bert, tok = tiny_bert
    ids = [np.zeros(0, np.int64)] + [
        np.array(tok(t)["input_ids"]) for t in ["one", "two words here", "three"]
    ]
    te = TextEncoder(bert, 1).eval()
    direct = ItemText(ids).pooled(te, torch.device("cpu"))
    cached = ItemText(ids)
    cached.build_cache(te, torch.device("cpu"))
    torch.testing.assert_close(cached.pooled(te, torch.device("cpu")), direct, atol=2e-2, rtol=0)
    assert direct[0].abs().sum() == 0  # padding item


def _model(**kw) -> RerankerNet:
    cfg = ModelConfig(encoder="tiny", dim=16, heads=2, **kw)
    text = None
    if cfg.use_text:
        text = TextEncoder(load_pretrained("tiny", seed=0)[0], cfg.trainable_layers)
    torch.manual_seed(0)
    return RerankerNet(cfg, num_items=20, text=text)


def test_items_the_user_already_has_are_left_out_of_the_softmax():
    model = _model(use_text=False).eval()
    hist = History(
        torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[0, 60, 30]])
    )
    scores, with_seen = model(hist, torch.tensor([5, 7, 9]), torch.tensor([1]), torch.zeros(3))
    _, without = model(hist, torch.tensor([7, 9]), torch.tensor([0]), torch.zeros(2))
    assert scores.shape == (1, 3) and torch.isfinite(with_seen)
    # Item 5 is in the history: being a candidate changes nothing.
    torch.testing.assert_close(with_seen, without)


def test_predict_with_shared_and_per_user_candidates_agree():
    model = _model(use_text=False).eval()
    hist = History(
        torch.tensor([[1, 2, 3], [0, 0, 4]]), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)
    )
    table = model.item_table()
    shared = model.predict(hist, table[[7, 8, 9]])
    per_user = model.predict(hist, table[[7, 8, 9]].expand(2, 3, -1))
    torch.testing.assert_close(shared, per_user)


def test_leading_padding_does_not_change_scores():
    model = _model(use_text=False).eval()
    items = [np.array([1, 2, 3]), np.array([4])]
    short = make_history(items, [np.ones(3), np.ones(1)], [np.arange(3), np.zeros(1)], [9, 9], 50)
    assert short.items.shape == (2, 3)
    pad = 50 - 3
    long = History(
        *(torch.nn.functional.pad(x, (pad, 0)) for x in (short.items, short.events, short.gaps))
    )
    table = model.item_table()
    torch.testing.assert_close(model.predict(short, table), model.predict(long, table))
    # Blocks of candidates of any size give the same scores.
    torch.testing.assert_close(model.predict(short, table, cells=64), model.predict(short, table))


def test_unknown_items_score_from_text_alone():
    model = _model(use_text=True, trainable_layers=0).eval()
    model.set_text_table(torch.randn(21, model.text.out_dim))
    before = model.item_table()[3].clone()
    model.items.known[3] = False
    with torch.no_grad():
        model.items.ids.weight[3] += 5.0  # an untrained ID row must not matter
    after = model.item_table()[3]
    torch.testing.assert_close(after, model.items.from_text(model.text_table[3]))
    assert not torch.allclose(before, after)


def test_items_new_at_an_examples_moment_are_scored_as_unknown_items():
    model = _model(use_text=True, trainable_layers=0).eval()
    model.set_text_table(torch.randn(21, model.text.out_dim))
    with torch.no_grad():
        model.items.unknown.normal_()
    day = 86_400
    first_seen = torch.full((21,), 0, dtype=torch.int64)
    first_seen[[3, 4]] = torch.tensor([90 * day, 200 * day])  # 4 first appears after both moments
    items = torch.tensor([2, 3, 4])
    times = torch.tensor([95 * day, 150 * day])
    new = new_at_moment(items, times, first_seen, days=14)
    # Item 3 is five days old at the first moment and sixty at the second; 4 is not out yet.
    assert new.tolist() == [[False, True, True], [False, False, True]]
    assert new_at_moment(items, times, first_seen, days=0) is None
    # In training, example b scores candidate c as a never-seen item where new[b, c].
    hist = History(
        torch.tensor([[1, 5], [0, 6]]), torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2)
    )
    scores, _ = model(hist, items, torch.tensor([0, 1]), torch.zeros(3), cand_new=new)
    known = model.item_vectors(items)
    unseen = model.items.from_text(model.text_table[items])
    per_example = torch.where(new.unsqueeze(-1), unseen, known)
    torch.testing.assert_close(scores, model.predict(hist, per_example))
    assert not torch.allclose(scores, model.predict(hist, known))


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_items_not_yet_seen_at_an_examples_moment_are_no_negatives(loss):
    """An item whose first event comes after the example could not have been picked then:
    counted as passed over, it taught the model that new items are rarely picked."""
    model = _model(use_text=False).eval()
    day = 86_400
    first_seen = torch.zeros(21, dtype=torch.int64)
    first_seen[9] = 200 * day
    items, times = torch.tensor([7, 8, 9]), torch.tensor([100 * day, 300 * day])
    later = not_yet_seen(items, times, first_seen)
    # Item 9 is not out at the first moment, and is at the second.
    assert later.tolist() == [[False, False, True], [False, False, False]]
    assert not_yet_seen(items, None, first_seen) is None
    hist = History(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2))

    def loss_of(score_of_9: float, mask: torch.Tensor | None) -> float:
        with torch.no_grad():
            model.items.ids.weight[9].fill_(score_of_9)
        _, out = model(
            hist, items, torch.tensor([0]), torch.zeros(3), loss=loss,
            negatives=torch.tensor([[1, 2]]), cand_later=mask,
        )  # fmt: skip
        return float(out)

    # The first example's loss does not depend on how item 9 scores, and without the
    # mask it does (item 9 counted as passed over).
    assert loss_of(-3.0, later[:1]) == pytest.approx(loss_of(3.0, later[:1]))
    assert loss_of(-3.0, None) != pytest.approx(loss_of(3.0, None))


def test_held_out_items_vanish_from_training_histories():
    batch = pa.table(
        {
            "hist_item_idx": pa.array([[1, 2, 3]]),
            "hist_event_idx": pa.array([[1, 1, 1]], pa.list_(pa.int8())),
            "hist_gap_s": pa.array([[30, 20, 10]]),
            "target_item_idx": pa.array([4], pa.int32()),
            "target_timestamp": pa.array([100], pa.int64()),
            "neg_item_idx": pa.array([[5, 6]]),
        }
    )
    hidden = np.zeros(10, dtype=bool)
    hidden[2] = True
    ex = to_examples(batch, 4, 1, hidden)
    assert ex.hist.items.tolist() == [[0, 1, 0, 3]]
    assert ex.negatives.tolist() == [[6]]


def test_shared_candidates_point_back_at_each_example():
    ex = ExampleBatch(
        hist=History(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3, 2)),
        targets=torch.tensor([4, 2, 4]),
        negatives=torch.tensor([[9, 2], [7, 9], [1, 3]]),
    )
    prob = torch.full((10,), 0.1)
    c = step_candidates(ex, prob, prob)
    assert c.items.tolist() == sorted(set(c.items.tolist()))
    assert c.items[c.labels].tolist() == [4, 2, 4]
    assert c.items[c.negatives].tolist() == ex.negatives.tolist()


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = _model(use_text=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.items.ids.weight.sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path)
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    load_optimizer(fresh, tmp_path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(b["state"][pid][key], v)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_learning_rate_warms_up_then_decays():
    f = [lr_factor(s, total=100, warmup=10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_explain_returns_the_predicted_scores_and_attention_over_the_history():
    model = _model(use_text=False).eval()
    hist = History(
        torch.tensor([[0, 2, 3, 2], [0, 0, 0, 4]]),
        torch.ones(2, 4, dtype=torch.long),
        torch.ones(2, 4),
    )
    cand = model.item_table()[[7, 8, 9]].expand(2, 3, -1)
    scores, att = model.explain(hist, cand)
    torch.testing.assert_close(scores, model.predict(hist, cand))
    assert att.shape == (2, 3, 4)
    valid = (hist.items > 0).unsqueeze(1)
    assert (att[~valid.expand_as(att)] == 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 3))


def test_attention_is_summed_per_history_item_and_sorted():
    from ray_app.model.ranker import attention_by_item

    hist = np.array([0, 5, 7, 5, 9])
    att = np.array([[0.0, 0.2, 0.3, 0.25, 0.25], [0.0, 0.1, 0.1, 0.1, 0.7]], np.float32)
    out = attention_by_item(hist, att, top=2)
    assert [i for i, _ in out[0]] == [5, 7] and out[0][0][1] == pytest.approx(0.45)
    assert [i for i, _ in out[1]] == [9, 5] and out[1][1][1] == pytest.approx(0.2)
    # Fewer items than asked for: every item once; an empty history names nothing.
    assert len(attention_by_item(hist, att, top=10)[0]) == 3
    assert attention_by_item(np.zeros(3, np.int64), att[:, :3], top=3) == [[], []]


def test_cheap_dropout_keeps_the_stock_distribution_scaling_and_gradient():
    """The CPU dropout draws its mask differently, not a different mask: each unit kept
    with probability 1 - p and scaled by 1 / (1 - p), the gradient through the same mask,
    and nothing dropped in eval mode."""
    import torch
    from torch import nn

    from ray_app.model.dropout import Dropout, cheap_dropout

    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.8))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    drop.eval()
    assert torch.equal(drop(x), x)
    layer = cheap_dropout(nn.TransformerEncoderLayer(8, 2, 16, 0.1, batch_first=True))
    assert all(type(m) is not nn.Dropout for m in layer.modules())
    assert {m.p for m in layer.modules() if isinstance(m, Dropout)} == {0.1}
