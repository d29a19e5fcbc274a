"""`rerank items add`: register a catalogue file with a running service, through its API.

The file (CSV, Parquet or JSON lines) has `item_id` and either `text` or the text
fields (title, genres, description, ...), which the service renders with the
template its model was trained with. Rows go in batches to `PUT /v1/items`.
A batch the service refuses in part (a row with a bad field, or a trained
item_id without `--replace`) is sent again without those rows, which are kept
with the service's reason in the rejects file; a 503 is retried after its
`Retry-After`. Nothing is dropped silently: the summary counts every row.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

from ray_app.data import schema

logger = logging.getLogger(__name__)

FIELDS = ("text", *schema.ITEM_TEXT_FIELDS)


class ServiceError(RuntimeError):
    """The service refused a whole batch for a reason no row explains (auth, size, 5xx)."""


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """The file's rows as PUT /v1/items items (empty fields left out)."""
    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if schema.ITEM_ID not in df.columns:
        raise ValueError(f"{path}: no {schema.ITEM_ID} column (columns: {list(df.columns)})")
    cols = [c for c in FIELDS if c in df.columns]
    if not cols:
        raise ValueError(f"{path}: no text column; expected one of {list(FIELDS)}")
    out = []
    for row in df[[schema.ITEM_ID, *cols]].to_dict("records"):
        item = {"item_id": str(row[schema.ITEM_ID])}
        for c in cols:
            v = row[c]
            if isinstance(v, str) and v.strip():
                item[c] = v
            elif isinstance(v, list | tuple) and v:
                item[c] = [str(x) for x in v]
        out.append(item)
    return out


def _put(url: str, body: dict[str, Any], token: str | None, timeout: float) -> tuple[int, Any]:
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/items",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return e.code, {"payload": payload, "retry_after": e.headers.get("Retry-After")}


def _row_errors(payload: Any) -> dict[int, str]:
    """Row index -> reason, from an error whose `loc` names rows (body.items.<i>...)."""
    out: dict[int, str] = {}
    details = payload.get("detail", []) if isinstance(payload, dict) else []
    for d in details:
        loc = d.get("loc", [])
        if len(loc) >= 3 and loc[:2] == ["body", "items"] and isinstance(loc[2], int):
            field = ".".join(str(p) for p in loc[3:])
            out.setdefault(loc[2], f"{d.get('type')}: {field}: {d.get('msg')}")
    return out


def add_items(
    path: str | Path,
    url: str,
    token: str | None = None,
    replace: bool = False,
    batch_size: int = 500,
    rejects: str | Path | None = None,
    timeout: float = 120.0,
    retries: int = 3,
) -> dict[str, Any]:
    """Register every row of `path` with the service at `url`; the counts, and where the
    rejected rows are."""
    items = read_items(path)
    rejects = Path(rejects) if rejects else Path(f"{path}.rejected.jsonl")
    rejected: list[dict[str, Any]] = []
    registered = replaced = 0
    t0 = time.time()
    for lo in range(0, len(items), batch_size):
        batch = items[lo : lo + batch_size]
        attempt = 0
        while batch:
            status, payload = _put(url, {"items": batch, "replace": replace}, token, timeout)
            if status == 200:
                registered += payload["registered"]
                replaced += sum(1 for i in payload["items"] if i["replaced"])
                break
            if status == 503 and attempt < retries:
                attempt += 1
                time.sleep(float(payload.get("retry_after") or 2))
                continue
            bad = _row_errors(payload.get("payload"))
            if status not in (409, 413, 422) or not bad:
                raise ServiceError(f"PUT /v1/items answered {status}: {payload.get('payload')}")
            for i, reason in sorted(bad.items()):
                rejected.append({**batch[i], "status": status, "error": reason})
            batch = [row for i, row in enumerate(batch) if i not in bad]
        logger.info("%d / %d rows sent", min(lo + batch_size, len(items)), len(items))
    if rejected:
        with open(rejects, "w", encoding="utf-8") as f:
            for row in rejected:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "rows": len(items),
        "registered": registered,
        "replaced": replaced,
        "rejected": len(rejected),
        "rejects": str(rejects) if rejected else None,
        "seconds": round(time.time() - t0, 1),
    }
