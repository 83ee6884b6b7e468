"""``verify`` and ``repair`` of a feature store, written once on the backends' primitives.

:meth:`Verifiable.verify` walks every entry and reports what is wrong as :class:`Problem` s (never raising for
what it finds); :meth:`Verifiable.repair` acts on them so that the next extract or import redoes what was lost:
broken items and tables are removed, entries mmcli never writes are removed (a link, never its target),
unreadable group metadata is reset (an encoder's provenance is restored by the next run of that encoder),
unreadable or missing root metadata is rebuilt from the items, and staging left by dead writers is cleared.
:class:`~mmcli.pipeline.store.interface.FeatureStore` inherits both.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli.pipeline.errors import StoreError
from mmcli.pipeline.store.checksum import checksum_problem, has_checksums
from mmcli.pipeline.store.keys import ITEM_ARRAYS, SCHEMA_VERSION, STAGING, TABULAR, ItemKey, Problem

UNVERIFIED = ("written before per-array checksums existed: valid, but a lost or changed chunk cannot be "
              "detected (unverified). Fix, if that matters: re-extract it with --force")


class Verifiable:
    """``verify`` / ``repair`` of :class:`~mmcli.pipeline.store.interface.FeatureStore` (a mixin: it uses only
    the store's primitives and item / table states, and its ``root_problem``)."""

    def verify(self, check_values: bool = True, check_sources: bool = True,
               notes: list[str] | None = None) -> list[Problem]:
        """Every incomplete or corrupt item and table (metadata, chunks present, data against their checksums),
        unreadable group or root metadata, entry mmcli never writes (refused keys, links) and staging leftover,
        as a list of problems. Never raises for what it finds.

        With ``check_sources``, an item whose source file is still reachable at its recorded path must match
        its recorded fingerprint (a changed slide means stale features); unreachable sources are not checked.
        ``notes`` (when given) receives one line per item that cannot be fully checked: written before
        checksums existed (valid, unverified).
        """
        problems = []
        if self.root_problem:
            problems.append(Problem("/", f"{self.root_problem}; `mmcli store verify --repair` rebuilds it from "
                                         "the items", "root"))
        problems += [Problem(s, "staging data left by an interrupted writer", "staging")
                     for s in self._staging_leftovers()]
        top, bad = self._scan_keys("")
        problems += bad
        for m in top:
            problems += self._verify_group(m)
            if m == TABULAR:
                problems += self._verify_tables()
                continue
            encoders, bad = self._scan_keys(m)
            problems += bad
            for e in encoders:
                problems += self._verify_group(f"{m}/{e}")
                dims: dict[int, str] = {}
                patients, bad = self._scan_keys(f"{m}/{e}")
                problems += bad
                for p in patients:
                    problems += self._verify_group(f"{m}/{e}/{p}")
                    item_ids, bad = self._scan_keys(f"{m}/{e}/{p}")
                    problems += bad
                    for i in item_ids:
                        problems += self._verify_item(ItemKey(m, e, p, i), check_values, dims, check_sources,
                                                      notes)
                if len(dims) > 1:
                    problems.append(Problem(f"/{m}/{e}", f"items disagree on feature dim: {sorted(dims)}", "none"))
        return problems

    def _verify_tables(self) -> list[Problem]:
        names, problems = self._scan_keys(TABULAR)
        for t in names:
            where = f"/{TABULAR}/{t}"
            state = self._table_state(t)
            if state.status != "ok":
                problems.append(Problem(where, state.why, "table"))
                continue
            try:
                arrays, attrs = self._read(f"{TABULAR}/{t}", ("values",))
            except Exception as e:  # noqa: BLE001 - any read failure is corruption to report
                problems.append(Problem(where, f"unreadable: {type(e).__name__}: {e}", "table"))
                continue
            why = checksum_problem(attrs, arrays)
            if why:
                problems.append(Problem(where, f"corrupt: {why}", "table"))
        return problems

    def _verify_group(self, key_path: str) -> list[Problem]:
        try:
            self._attrs(key_path)
        except StoreError as e:
            return [Problem(f"/{key_path}", f"unreadable group metadata ({e})", "group")]
        return []

    def _verify_item(
        self, key: ItemKey, check_values: bool, dims: dict[int, str], check_sources: bool = True,
        notes: list[str] | None = None,
    ) -> list[Problem]:
        where = f"/{key.path}"
        state = self._item_state(key.path)
        if state.status != "ok":
            return [Problem(where, state.why if state.status == "incomplete" else f"corrupt: {state.why}")]
        links = self._deep_links(key.path)
        if links:
            return [Problem(where, f"corrupt: holds links ({', '.join(links[:3])}); mmcli never writes links")]
        attrs = state.attrs
        try:
            arrays, _ = self._read(key.path, ITEM_ARRAYS)
        except Exception as e:  # noqa: BLE001 - any read failure is corruption to report
            return [Problem(where, f"unreadable: {type(e).__name__}: {e}")]
        f, c = arrays.get("features"), arrays.get("coords")
        if f is None or f.ndim != 2:
            return [Problem(where, f"features missing or not 2-D: {None if f is None else f.shape}")]
        why = checksum_problem(attrs, arrays)
        if why:
            return [Problem(where, f"corrupt: {why}")]
        if notes is not None and not has_checksums(attrs):
            notes.append(f"{where}: {UNVERIFIED}")
        out = []
        if attrs.get("n") != f.shape[0] or attrs.get("dim") != f.shape[1]:
            out.append(Problem(where, f"attrs n/dim {attrs.get('n')}/{attrs.get('dim')} != shape {f.shape}"))
        if c is not None and c.shape != (f.shape[0], 2):
            out.append(Problem(where, f"coords shape {c.shape} != ({f.shape[0]}, 2)"))
        if check_values and f.size and not np.isfinite(f).all():
            out.append(Problem(where, f"{int((~np.isfinite(f)).sum())} non-finite feature values"))
        dims.setdefault(int(f.shape[1]), where)
        fp = attrs.get("source_fingerprint")
        if check_sources and isinstance(fp, dict) and isinstance(fp.get("path"), str) and Path(fp["path"]).is_file():
            from mmcli.pipeline.fingerprint import same_source, source_fingerprint

            if not same_source(fp, source_fingerprint(fp["path"])):
                out.append(Problem(where, f"source {fp['path']} changed since extraction (stale features)"))
        return out

    def repair(self, problems: list[Problem] | None = None,
               staging_older_than_s: float = 3600.0) -> list[str]:
        """Act on the problems of :meth:`verify`: rebuild unreadable root metadata from the items, remove broken
        items and tables (a re-run redoes them) and entries mmcli never writes, reset unreadable group metadata,
        clear old staging leftovers. Returns what was done, one line each."""
        self._writable()
        done = []
        problems = problems if problems is not None else self.verify()
        for p in sorted(problems, key=lambda p: p.kind != "root"):  # the root first
            path = p.where.strip("/")
            remove = {"item": self._delete, "table": self._delete, "entry": self._remove_entry}.get(p.kind)
            if remove is not None and remove(path):
                done.append(p.where)
            elif p.kind == "root":
                version = self._rebuild_root()
                done.append(f"/ (root metadata rebuilt: schema_version {SCHEMA_VERSION}, mmcli_version {version})")
            elif p.kind == "group":
                self._reset_group(path, {})
                restore = ("; the next extract or import of this encoder restores its provenance"
                           if path.count("/") == 1 and not path.startswith(TABULAR) else "")
                done.append(f"{p.where} (unreadable metadata reset{restore})")
        if self._clear_staging(staging_older_than_s):
            done.append(f"/{STAGING}")
        return done

    def _rebuild_root(self) -> str:
        """Write the root metadata anew: this schema, and the oldest mmcli version the items were written with
        (this mmcli's when none says); returns that version."""
        paths = [m for m in _names(self, "") if m != TABULAR]
        for _ in range(3):  # modality -> encoder -> patient -> item
            paths = [f"{p}/{n}" for p in paths for n in _names(self, p)]
        versions = {v for p in paths if isinstance(v := _attrs_or_empty(self, p).get("mmcli_version"), str)}
        version = _oldest(versions) or __version__
        self._reset_group("", {"mmcli_version": version, "schema_version": SCHEMA_VERSION,
                               "rebuilt": {"by": "mmcli store verify --repair", "mmcli_version": __version__,
                                           "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})
        self.root_problem = ""
        return version


def _names(store: Any, key_path: str) -> list[str]:
    """The safe children of ``key_path`` (odd entries are left to verify / repair)."""
    return store._scan_keys(key_path)[0]


def _attrs_or_empty(store: Any, key_path: str) -> dict[str, Any]:
    try:
        return store._attrs(key_path) or {}
    except StoreError:
        return {}


def _oldest(versions: set[str]) -> str | None:
    """The oldest of ``versions`` by their numbers (``0.1.0`` < ``0.10.0``); None when empty."""
    return min(versions, key=lambda v: (tuple(int(x) for x in re.findall(r"\d+", v)), v)) if versions else None
