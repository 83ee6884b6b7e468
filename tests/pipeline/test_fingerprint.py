"""Source fingerprints (issue 29 item 7): a file rewritten with the same bytes is the same source even though its
mtime changed; an edit of the same size, a different size or a different path is not."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmcli.pipeline import fingerprint as fpm
from mmcli.pipeline.fingerprint import same_source, source_fingerprint
from mmcli.pipeline.store import open_store


def _touch(p: Path, ns: int = 10**9) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + ns))


def test_same_bytes_new_mtime_is_the_same_source(tmp_path: Path) -> None:
    p = tmp_path / "note.txt"
    p.write_bytes(b"x" * 100_000)  # longer than the 64 KiB head: the whole-file hash decides
    old = source_fingerprint(p)
    p.write_bytes(b"x" * 100_000)
    _touch(p)
    new = source_fingerprint(p)
    assert new["mtime_ns"] != old["mtime_ns"] and new["sha256"] == old["sha256"]
    assert same_source(old, new)


def test_an_edit_behind_the_head_is_a_change(tmp_path: Path) -> None:
    p = tmp_path / "vol.nii.gz"
    p.write_bytes(b"x" * 100_000)
    old = source_fingerprint(p)
    p.write_bytes(b"x" * 99_999 + b"y")  # same size, same first 64 KiB
    _touch(p)
    new = source_fingerprint(p)
    assert new["head_sha256"] == old["head_sha256"] and new["size"] == old["size"]
    assert not same_source(old, new)
    # a different path or size is never the same source
    assert not same_source(old, {**old, "path": "/elsewhere"})
    assert not same_source(old, {**old, "size": old["size"] + 1})


def test_large_files_and_old_fingerprints_keep_the_mtime_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FULL_HASH_MAX no whole-file hash is taken: a new mtime counts as a change. A fingerprint written
    before ``sha256`` existed matches while the mtime is unchanged."""
    p = tmp_path / "slide.svs"
    p.write_bytes(b"z" * 5000)
    monkeypatch.setattr(fpm, "FULL_HASH_MAX", 1000)
    old = source_fingerprint(p)
    assert "sha256" not in old
    assert same_source(old, source_fingerprint(p))
    _touch(p)
    assert not same_source(old, source_fingerprint(p))
    monkeypatch.undo()
    legacy = {k: v for k, v in source_fingerprint(p).items() if k != "sha256"}
    assert same_source(legacy, source_fingerprint(p))
    assert not same_source(None, source_fingerprint(p)) and not same_source(legacy, None)


def test_store_cache_check_uses_same_source(tmp_path: Path) -> None:
    """The store's resume check (``is_cached``) and ``verify`` accept a touched but identical source."""
    import numpy as np

    src = tmp_path / "a.txt"
    src.write_text("same words")
    s = open_store(tmp_path / "s.zarr")
    s.write_item("text", "e", "P1", "note", np.zeros((1, 4), np.float32), None,
                 {"source_fingerprint": source_fingerprint(src)})
    src.write_text("same words")
    _touch(src)
    assert s.is_cached("text", "e", "P1", "note", fingerprint=source_fingerprint(src))
    assert s.verify() == []
    src.write_text("other words")
    assert not s.is_cached("text", "e", "P1", "note", fingerprint=source_fingerprint(src))
    assert "changed since extraction" in str(s.verify())
