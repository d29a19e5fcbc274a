"""Do two runs give the same outputs? Compare two output trees file by file.

    python jobs/compare_runs.py runs/before runs/after [--rtol 1e-4] [--atol 1e-6]

For checking that a change which should not change behaviour (a refactor, an
upgrade) did not: run the same commands before and after into two folders, then
compare them. Each folder may hold any stage outputs (a pipeline workdir, or
prepared/, model/, topk/, evaluation/ side by side); files are paired by their
path relative to the folder. What is compared:

- Parquet datasets (a folder of part files, or one file): the multiset of rows,
  floats rounded to `--decimals`, so the order rows were written in does not
  matter but every value does; a difference is counted in rows.
- JSON files (manifests, metrics): every number within `rtol`/`atol`, every
  other value equal, after each folder's own path is replaced by `<root>`; keys
  that differ between any two runs by nature (run ids, wall-clock times,
  throughput) are left out.
- safetensors files (weights, item vectors): every tensor within `rtol`/`atol`,
  with the largest absolute difference reported.
- Nightly top-K partitions also get the share of users whose list (the item ids
  in rank order) is the same.

Everything else (PNG plots, markdown, logs, the `_SUCCESS` marker) is only
checked for being present on both sides. Exit code 0 when every pair agrees.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads

VOLATILE = re.compile(
    r"(^|_)(run_id|timings?|seconds|created(_at)?|started(_at)?|finished(_at)?|elapsed|"
    r"host(name)?|pid|wall)(_|$)|_s$|per_s|per_second|throughput|^t_|log_file"
)


def _rows(files: list[Path], decimals: int) -> Counter:
    table = pads.dataset([str(f) for f in files], format="parquet").to_table()
    cols = table.column_names
    out: Counter = Counter()
    for row in table.to_pylist():
        out[json.dumps([_round(row[c], decimals) for c in cols], default=str)] += 1
    return out


def _round(v: Any, decimals: int) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, decimals)
    if isinstance(v, list):
        return [_round(x, decimals) for x in v]
    if isinstance(v, dict):
        return {k: _round(x, decimals) for k, x in v.items()}
    return v


def compare_parquet(a: list[Path], b: list[Path], decimals: int) -> tuple[bool, str]:
    ra, rb = _rows(a, decimals), _rows(b, decimals)
    n = sum(ra.values())
    if ra == rb:
        return True, f"{n} rows, all equal"
    only_a = sum((ra - rb).values())
    only_b = sum((rb - ra).values())
    return False, f"{n} vs {sum(rb.values())} rows; {only_a} only in A, {only_b} only in B"


def _numbers_close(x: float, y: float, rtol: float, atol: float) -> bool:
    if math.isnan(x) and math.isnan(y):
        return True
    return math.isclose(x, y, rel_tol=rtol, abs_tol=atol)


def _walk_json(a: Any, b: Any, where: str, rtol: float, atol: float, out: list[str]) -> float:
    """Differences between two JSON values (appended to `out`); returns the largest
    absolute difference between numbers seen."""
    worst = 0.0
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if VOLATILE.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'B' if k not in a else 'A'}")
                continue
            worst = max(worst, _walk_json(a[k], b[k], f"{where}.{k}", rtol, atol, out))
        return worst
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} entries")
            return worst
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            worst = max(worst, _walk_json(x, y, f"{where}[{i}]", rtol, atol, out))
        return worst
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool):
        diff = abs(float(a) - float(b))
        if not _numbers_close(float(a), float(b), rtol, atol):
            out.append(f"{where}: {a} vs {b}")
        return 0.0 if math.isnan(diff) else diff
    if a != b:
        out.append(f"{where}: {a!r} vs {b!r}")
    return worst


def compare_json(
    a: Path, b: Path, roots: tuple[Path, Path], rtol: float, atol: float
) -> tuple[bool, str]:
    ta = a.read_text().replace(str(roots[0].resolve()), "<root>").replace(str(roots[0]), "<root>")
    tb = b.read_text().replace(str(roots[1].resolve()), "<root>").replace(str(roots[1]), "<root>")
    diffs: list[str] = []
    worst = _walk_json(json.loads(ta), json.loads(tb), "", rtol, atol, diffs)
    if not diffs:
        return True, f"equal (largest number difference {worst:.3g})"
    return False, f"{len(diffs)} differences, e.g. " + "; ".join(diffs[:3])


def compare_safetensors(a: Path, b: Path, rtol: float, atol: float) -> tuple[bool, str]:
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return False, f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"
    worst, bad = 0.0, []
    for name in ta:
        x, y = ta[name].astype(np.float64), tb[name].astype(np.float64)
        if x.shape != y.shape:
            bad.append(f"{name}: shape {x.shape} vs {y.shape}")
            continue
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y))))
        if not np.allclose(x, y, rtol=rtol, atol=atol):
            bad.append(name)
    if bad:
        return (
            False,
            f"{len(bad)} of {len(ta)} tensors differ (e.g. {bad[:3]}), max |diff| {worst:.3g}",
        )
    return True, f"{len(ta)} tensors within tolerance, max |diff| {worst:.3g}"


def same_lists(a: list[Path], b: list[Path]) -> str:
    """Share of users whose top-K item ids, in rank order, are the same."""

    def lists(files: list[Path]) -> dict[str, list[str]]:
        t = pads.dataset([str(f) for f in files], format="parquet").to_table().to_pandas()
        user = next(c for c in ("user_id", "user") if c in t.columns)
        item = next(c for c in ("item_id", "item") if c in t.columns)
        if "rank" in t.columns:
            t = t.sort_values([user, "rank"])
            return t.groupby(user)[item].apply(list).to_dict()
        return {str(u): list(v) for u, v in zip(t[user], t[item], strict=True)}

    la, lb = lists(a), lists(b)
    users = set(la) | set(lb)
    same = sum(1 for u in users if la.get(u) == lb.get(u))
    return f"same top-K list for {same}/{len(users)} users ({same / max(1, len(users)):.2%})"


def _datasets(root: Path) -> dict[str, list[Path]]:
    """Relative folder -> its Parquet files, read as one dataset (part files are named
    differently by every run, so they are paired by folder, not by name)."""
    found: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*.parquet")):
        rel = f.relative_to(root)
        if any(p.startswith(".") for p in rel.parts):
            continue  # staging debris of an unfinished run
        found.setdefault(str(rel.parent), []).append(f)
    return found


def compare(
    a: Path, b: Path, rtol: float, atol: float, decimals: int
) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    da, db = _datasets(a), _datasets(b)
    for rel in sorted(set(da) | set(db)):
        if rel not in da or rel not in db:
            results.append((rel, False, f"only in {'A' if rel in da else 'B'}"))
            continue
        ok, msg = compare_parquet(da[rel], db[rel], decimals)
        if re.search(r"(^|/)dt=[^/]+$", rel):
            msg += "; " + same_lists(da[rel], db[rel])
        results.append((rel, ok, msg))
    files_a = {str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()}
    files_b = {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()}
    for rel in sorted(files_a | files_b):
        if rel.endswith(".parquet") or any(p.startswith(".") for p in Path(rel).parts):
            continue
        if rel not in files_a or rel not in files_b:
            results.append((rel, False, f"only in {'A' if rel in files_a else 'B'}"))
        elif rel.endswith(".json"):
            results.append((rel, *compare_json(a / rel, b / rel, (a, b), rtol, atol)))
        elif rel.endswith(".safetensors"):
            results.append((rel, *compare_safetensors(a / rel, b / rel, rtol, atol)))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of numbers")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance of numbers")
    p.add_argument("--decimals", type=int, default=5, help="Parquet floats rounded to this")
    args = p.parse_args()
    results = compare(args.a, args.b, args.rtol, args.atol, args.decimals)
    width = max((len(r[0]) for r in results), default=10)
    for rel, ok, msg in results:
        print(f"{'same' if ok else 'DIFF'}  {rel:<{width}}  {msg}")
    bad = sum(not ok for _, ok, _ in results)
    print(f"\n{len(results) - bad} of {len(results)} outputs agree (rtol {args.rtol}, "
          f"atol {args.atol}, Parquet floats to {args.decimals} decimals)")  # fmt: skip
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
