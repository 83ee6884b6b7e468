"""``mmcli store share``: copy a feature store for sharing, without source paths and, with a key, with
pseudonymised patient and item ids.

What the shared store holds: features, tile coordinates, tables, encoder provenance (names, weights hashes,
tile parameters) and source file sizes/hashes. What it does not hold: source paths (folder and file names
often carry names or hospital numbers), weights/model/QC file locations, absolute paths inside any text
attribute, note text (never stored by extract) and, with ``--pseudonymize``, the original ids (also where
they occur inside text, e.g. a warning naming the slide file). The id mapping is never written into the shared
store; the owner keeps the key file and can re-derive it, or ask for ``--mapping`` (a CSV to keep private).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.manifest import load_labels
from mmcli.pipeline.pseudonym import load_or_create_key, pseudonym
from mmcli.pipeline.store import open_store

# attrs that hold file locations: source paths, weights files / model folders, QC images
_PATH_KEYS = {"path", "source", "slide_path", "file", "filename", "weights", "qc_png"}
_PATH_SUFFIXES = ("_path", "_folder", "_dir", "_file", "_png")
# an absolute path inside free text (a warning, a description): "/a/b..." or "C:\\a\\b..."
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:\\)[^\s\"'<>|;,]*[/\\][^\s\"'<>|;,]*")


def _scrub(value: Any, replace: dict[str, str]) -> Any:
    """Drop path-like keys, blank absolute paths in text and replace original ids inside any string."""
    if isinstance(value, dict):
        return {k: _scrub(v, replace) for k, v in value.items()
                if k not in _PATH_KEYS and not k.endswith(_PATH_SUFFIXES)}
    if isinstance(value, list):
        return [_scrub(v, replace) for v in value]
    if isinstance(value, str):
        value = _ABS_PATH.sub("<path>", value)
        for old in sorted(replace, key=len, reverse=True):
            value = value.replace(old, replace[old])
        return value
    return value


def _source_names(attrs: dict[str, Any], new_item: str) -> dict[str, str]:
    """The source file's name and stem (they often carry ids, e.g. in warnings) -> the item's pseudonym."""
    fp = attrs.get("source_fingerprint")
    if not isinstance(fp, dict) or not isinstance(fp.get("path"), str):
        return {}
    src = Path(fp["path"])
    return {n: new_item for n in (src.name, src.stem) if len(n) >= 3}


def share_store(
    src: str | Path,
    dst: str | Path,
    key_file: str | Path | None = None,
    labels: str | Path | None = None,
    labels_out: str | Path | None = None,
    mapping: str | Path | None = None,
) -> dict[str, Any]:
    """Copy ``src`` to a new store ``dst`` meant for sharing. See the module docstring for what it holds."""
    src_store = open_store(src, "r")
    if Path(dst).exists():
        raise InputError(f"{dst} already exists. Fix: choose a new path for the shared store.")
    dst_store = open_store(dst, "a")
    key, created = load_or_create_key(key_file) if key_file else (None, False)

    def pid_of(p: str) -> str:
        return pseudonym(key, p) if key else p

    def iid_of(p: str, i: str) -> str:
        return pseudonym(key, f"{p}/{i}", prefix="i", n_hex=12) if key else i

    ids: dict[str, str] = {}
    keys = list(src_store.iter_items())
    for k in keys:
        ids[k.patient_id] = pid_of(k.patient_id)
    tables = {t: src_store.read_table(t) for t in src_store.tables()}
    for t in tables.values():
        ids.update({str(p): pid_of(str(p)) for p in t.index})
    for m in src_store.modalities():
        for e in src_store.encoders(m):
            dst_store.set_encoder_attrs(m, e, _scrub(src_store.encoder_attrs(m, e), ids if key else {}))
    n_items = 0
    for k in keys:
        item = src_store.read_item(k.modality, k.encoder_id, k.patient_id, k.item_id)
        new_item = iid_of(k.patient_id, k.item_id)
        replace = {**ids, k.item_id: new_item, **_source_names(item.attrs, new_item)} if key else {}
        attrs = _scrub({a: v for a, v in item.attrs.items() if a not in ("complete", "n", "dim")}, replace)
        dst_store.write_item(k.modality, k.encoder_id, ids[k.patient_id], new_item, item.features, item.coords, attrs)
        n_items += 1
    for name, t in tables.items():
        t = t.copy()
        t.index = [ids[str(p)] for p in t.index]
        dst_store.write_table(name, t)
    if labels is not None:
        if labels_out is None:
            raise InputError("--labels needs --labels-out (where to write the pseudonymised labels).")
        df = load_labels(labels)
        df.index = [pid_of(str(p)) for p in df.index]
        df.index.name = "patient_id"
        df.to_csv(labels_out)
    if mapping is not None:
        with open(mapping, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "pseudonym"])
            w.writerows(sorted(ids.items()))
    return {"items": n_items, "patients": len(ids), "tables": len(tables), "pseudonymized": bool(key),
            "key_created": created}
