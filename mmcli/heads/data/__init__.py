"""Stage-2 data: a cohort's cached features read from a feature store into per-patient bags and vectors.

Modules: :mod:`.cohort` (:class:`Cohort`, :class:`ModalityData`, :class:`ModalitySpec`), :mod:`.bags` (bags
read under a memory budget, mini-batch padding), :mod:`.sources` (which modalities, encoders and tables; the
covariates a head reads), :mod:`.load` (:func:`load_cohort`).
"""
from __future__ import annotations

from mmcli.heads.data.bags import BagCache, BagList, pad_bags, pad_batch
from mmcli.heads.data.cohort import BAG_MODALITIES, STORE_SOURCE, TABLE_SOURCE, Cohort, ModalityData, ModalitySpec
from mmcli.heads.data.load import load_cohort
from mmcli.heads.data.sources import (
    Source,
    available_modalities,
    covariates_for,
    model_sources,
    patients_in,
    resolve_sources,
)

__all__ = ["BAG_MODALITIES", "STORE_SOURCE", "TABLE_SOURCE", "BagCache", "BagList", "Cohort", "ModalityData",
           "ModalitySpec", "Source", "available_modalities", "covariates_for", "load_cohort", "model_sources",
           "pad_bags", "pad_batch", "patients_in", "resolve_sources"]
