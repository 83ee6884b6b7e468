"""Bags under a memory budget (issue 23): a fit reads the same numbers whatever the budget, a bag beyond the
budget is read per mini-batch with only its sampled rows, the cache never holds more than the budget, and
inference batches stay within their byte bound."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.planted_data import make_store
from mmcli.heads.data import load_cohort, resolve_sources
from mmcli.heads.data.bags import BagCache, BagList, StoreBags, inference_batches, pad_bags, pad_batch
from mmcli.heads.targets import build_target
from mmcli.heads.training.cv import cross_validate
from mmcli.pipeline.store import open_store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bags") / "s.zarr", n=30, task="binary", seed=5, dim=16,
                      tiles=(40, 90), modalities=("wsi",))


def _cohort(p, budget):
    fs = open_store(p.store, "r")
    return load_cohort(fs, resolve_sources(fs, ["wsi"]), sorted(p.labels.index), memory_budget=budget)


class _Counting:
    """Wraps a store and counts whole-item reads and partial (row) reads."""

    def __init__(self, store):
        self.store, self.whole, self.rows = store, 0, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read_item(self, *a, **k):
        self.whole += 1
        return self.store.read_item(*a, **k)

    def read_rows(self, key, rows, **k):
        self.rows += len(rows)
        return self.store.read_rows(key, rows, **k)


def test_same_numbers_under_any_budget(planted):
    """Unlimited, a budget that holds a few bags, and none at all: the same cross-validated predictions."""
    target = build_target(planted.labels, target="label")
    preds = []
    for budget in (None, 200_000 + 128 * 1024 * 1024, 0):
        cohort = _cohort(planted, budget)
        res = cross_validate("attention_mil", cohort, target, folds=3, seed=0,
                             params={"epochs": 4, "max_instances": 32}, explain="default")
        preds.append(np.concatenate([r.pred[:, 1] for r in res]))
        att = [a for r in res for a in r.attention["wsi"]]
        assert all(a is not None and len(a) for a in att)
    np.testing.assert_array_equal(preds[0], preds[1])
    np.testing.assert_array_equal(preds[0], preds[2])


def test_beyond_the_budget_only_the_sampled_rows_are_read(planted):
    fs = open_store(planted.store, "r")
    cohort = load_cohort(fs, resolve_sources(fs, ["wsi"]), sorted(planted.labels.index), memory_budget=0)
    bags = cohort.modalities["wsi"].bags
    src = bags.source
    assert isinstance(src, StoreBags) and len(src.cache) == 0  # nothing kept: the budget is below one batch
    counting = _Counting(src.store)
    src.store = counting
    x, mask = pad_batch(bags, np.arange(4), 16, max_instances=8, rng=np.random.default_rng(0))
    assert counting.whole == 0 and counting.rows == 4 * 8 and mask.sum() == 32
    # the same draws as sampling the whole bags in memory
    whole = [bags[i] for i in range(4)]
    x2, mask2 = pad_bags(whole, 16, max_instances=8, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(mask, mask2)


def test_the_cache_holds_at_most_its_capacity():
    cache = BagCache(1000)
    for k in range(10):
        cache.put((0, k), np.zeros(30, dtype=np.float64))  # 240 bytes each
    assert cache.used <= 1000 and len(cache) == 4
    assert cache.get((0, 9)) is not None and cache.get((0, 0)) is None  # least recently used went first
    cache.put((0, 99), np.zeros(200, dtype=np.float64))  # larger than the whole budget: not kept
    assert cache.get((0, 99)) is None


def test_bag_means_come_from_the_first_pass(planted):
    cohort = _cohort(planted, 0)
    m = cohort.modalities["wsi"]
    counting = _Counting(m.bags.source.store)
    m.bags.source.store = counting
    pooled = m.pooled()
    assert counting.whole == 0  # pooling for vector heads reads nothing again
    np.testing.assert_allclose(pooled[0], m.bags[0].mean(axis=0, dtype=np.float64), rtol=1e-6)


def test_inference_batches_bound_the_padded_bytes():
    counts = np.array([5, 3000, 10, 2900, 7, 3100])
    batches = inference_batches(counts, batch_size=32, dim=1024, max_bytes=64 * 1024 * 1024)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * counts[b].max() * 1024 * 4 <= 64 * 1024 * 1024
    small = inference_batches(np.array([5, 6, 7]), batch_size=2, dim=16)
    assert [len(b) for b in small] == [2, 1]


def test_in_memory_bags_and_views():
    bags = BagList.of([np.ones((3, 2)), None, np.zeros((5, 2))])
    view = bags.subset([2, 0])
    assert view.lengths().tolist() == [5, 3] and view[1].shape == (3, 2) and bags.length(1) == 0
    assert view.sample(0, 2, np.random.default_rng(0)).shape == (2, 2)
    with pytest.raises(TypeError):
        bags[0:2]
