"""Items/s of the text tower on CPUs: PyTorch, ONNX Runtime float32 and int8.

    python jobs/bench_encode.py                       # the bundled MiniLM, MovieLens titles
    python jobs/bench_encode.py --model runs/movielens/model --threads 1 2

The tower is what encodes a new item: encoder, pooling and the item tower's
projection. With --model it is that artifact's fine-tuned tower; without, the
bundled all-MiniLM-L6-v2 with a seeded random projection (the cost is the
encoder's; the projection is one small matrix). Texts are ml-latest-small's
"title | genres" when ../shared/data has it (else generated), tokenised once, in
batches of --batch (a request with that many new items). Every backend encodes
the same batches in this one run, at each thread count; prints items/s, the
ratio to PyTorch at the same thread count, and the parity of the vectors against
PyTorch (minimum and median cosine over all items).

With --model and --prepared (the prepare output it was trained on) it also ranks
the test split's full catalogue for every test user with each backend's vectors
in place of the item table, every item then known by its text alone (what a new
item gets), and prints NDCG@10 of each and the share of identical top-10 lists.
With --model the texts are the artifact's own item texts, as it was trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("bench_encode")
MOVIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small" / "movies.csv"


def _texts(limit: int | None) -> list[str]:
    if MOVIES.exists():
        import pandas as pd

        df = pd.read_csv(MOVIES)
        texts = (df["title"] + " | " + df["genres"].str.replace("|", ", ")).tolist()
    else:
        rng = np.random.default_rng(0)
        words = ["space", "love", "war", "comedy", "night", "city", "dog", "king", "lost", "sea"]
        texts = [" ".join(rng.choice(words, 8)) + f" {i}" for i in range(5000)]
    return texts[:limit] if limit else texts


def _tower(model: str | None, seed: int = 0):
    from ray_app.model.encoder import TextEncoder, load_pretrained
    from ray_app.model.onnx_text import TextTower

    if model:
        from ray_app.model.artifact import load_artifact

        art = load_artifact(model)
        return (
            TextTower(art.model.text, art.model.items).eval(),
            art.tokenizer,
            int(art.config.get("text_max_length", 32)),
        )
    from ray_app.model.config import ModelConfig
    from ray_app.model.net import ItemTower

    bert, tokenizer = load_pretrained("default")
    torch.manual_seed(seed)
    text = TextEncoder(bert, trainable_layers=0)
    items = ItemTower(ModelConfig(use_ids=False, dim=64), 0, text.out_dim)
    return TextTower(text, items).eval(), tokenizer, 32


def _batches(tokenizer, texts: list[str], batch: int, max_length: int) -> list[tuple]:
    out = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(
            texts[i : i + batch],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="np",
        )
        out.append((tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)))
    return out


def _run(encode, batches) -> tuple[float, np.ndarray]:
    encode(*batches[0])  # warm-up: graph optimisation, allocator
    t0 = time.perf_counter()
    vecs = [encode(ids, att) for ids, att in batches]
    seconds = time.perf_counter() - t0
    return sum(len(b[0]) for b in batches) / seconds, np.concatenate(vecs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model artifact (default: bundled MiniLM + random projection)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=100, help="items per call (default 100)")
    p.add_argument("--items", type=int, help="encode only the first N texts")
    p.add_argument("--prepared", help="with --model: rank the test split with each backend")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ray_app.model.onnx_text import OnnxTextTower, export, quantize_int8

    tower, tokenizer, max_length = _tower(args.model)
    texts = _artifact_texts(args.model, args.items) if args.model else _texts(args.items)
    batches = _batches(tokenizer, texts, args.batch, max_length)
    print(f"{len(texts)} texts, batches of {args.batch}, max_length {max_length}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fp32 = export(tower, Path(tmp) / "tower.onnx", max_length)
        int8 = quantize_int8(fp32, Path(tmp) / "tower.int8.onnx")
        print(f"export + quantise: {time.perf_counter() - t0:.1f} s", flush=True)
        rows, reference, vectors = [], {}, {}
        for threads in args.threads:
            torch.set_num_threads(threads)

            def torch_encode(ids, att):
                with torch.no_grad():
                    return tower(torch.from_numpy(ids), torch.from_numpy(att)).numpy()

            backends = {
                "torch": torch_encode,
                "onnx": OnnxTextTower(fp32, threads),
                "onnx-int8": OnnxTextTower(int8, threads),
            }
            base = None
            for name, encode in backends.items():
                rate, vecs = _run(encode, batches)
                vectors.setdefault(name, vecs)
                if name == "torch":
                    base = rate
                    reference.setdefault("vecs", vecs)
                cos = _cosines(vecs, reference["vecs"])
                rows.append(
                    {
                        "threads": threads,
                        "backend": name,
                        "items_per_s": round(rate, 1),
                        "x_torch": round(rate / base, 2),
                        "cosine_min": round(float(cos.min()), 5),
                        "cosine_median": round(float(np.median(cos)), 5),
                    }
                )
                print(
                    f"threads {threads}  {name:10s} {rate:8.1f} items/s  {rate / base:5.2f}x torch"
                    f"  cosine vs torch min {cos.min():.5f} median {np.median(cos):.5f}",
                    flush=True,
                )
    ranking = _rankings(args.model, args.prepared, vectors) if args.prepared else []
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": rows, "ranking": ranking}, indent=2) + "\n")


def _artifact_texts(model: str, limit: int | None) -> list[str]:
    from ray_app.data import schema
    from ray_app.model.artifact import load_artifact

    texts = load_artifact(model).items[schema.TEXT].iloc[1:].astype(str).tolist()
    return texts[:limit] if limit else texts


def _rankings(model: str, prepared: str, vectors: dict[str, np.ndarray]) -> list[dict]:
    """NDCG@10 of the test split's full ranking with each backend's text vectors as the
    item table, and the share of users whose top-10 equals PyTorch's."""
    from ray_app.model.artifact import load_artifact
    from ray_app.protocol import metrics
    from ray_app.protocol.data import load_prepared
    from ray_app.protocol.scorer import NetScorer
    from ray_app.protocol.scoring import score_split

    art, data = load_artifact(model), load_prepared(prepared)
    targets = data.splits["test"]
    torch.set_num_threads(2)
    runs = {}
    tables = {"trained item table": art.item_vectors.numpy()[1:], **vectors}
    for name, vecs in tables.items():
        table = torch.cat([torch.zeros(1, vecs.shape[1]), torch.from_numpy(vecs).float()])
        with torch.no_grad():
            runs[name] = score_split(NetScorer(art.model, table), targets, None, 10)
    out = []
    ref = runs["torch"]["topk"]
    for name, run in runs.items():
        same = float(np.mean(np.all(run["topk"] == ref, axis=1)))
        overlap = float(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(run["topk"], ref, strict=True)])
        )
        ndcg = metrics.mean_defined(metrics.ndcg(run["full"], 10))
        out.append(
            {
                "vectors": name,
                "ndcg@10_full": round(ndcg, 4),
                "same_top10": round(same, 4),
                "overlap@10": round(overlap, 4),
            }
        )
        print(
            f"test users {len(targets)}  {name:20s} full NDCG@10 {ndcg:.4f}  "
            f"top-10 identical to torch's: {same:.1%}  overlap@10 with torch's: {overlap:.1%}",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
