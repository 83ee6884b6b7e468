"""Encoder names as each peer spells them: TRIDENT's patch-encoder names (its ``features_<name>/`` folders, which
its slide-encoder step looks for) and STAMP's extractor names (the ``extractor`` attribute its encoding step
checks), mapped to and from mmcli's preset names.

Sources: TRIDENT a91fa84 ``patch_encoder_models/load.py`` ``encoder_registry``; STAMP 2.5.0
``preprocessing/config.py`` ``ExtractorName`` (hyphenated since 2025-06: ``h-optimus-0``, ``chief-ctranspath``,
``dino-bloom``, ``virchow-full``, ``red-dino``).

The same word can mean different weights: TRIDENT's ``ctranspath`` loads CHIEF's CTransPath checkpoint (STAMP's
``chief-ctranspath``), STAMP's ``ctranspath`` the original TransPath one; so a name is read in the vocabulary of the
format it came from (:func:`canonical`). And the same model can give different features: STAMP's ``virchow2`` is
the 1280-d CLS token, mmcli's and TRIDENT's ``virchow2`` the 2560-d CLS + mean patch token; an export to STAMP
writes the CLS half (:data:`STAMP_CLS_WIDTH`).
"""
from __future__ import annotations

import re

TRIDENT_NAMES = frozenset({
    "conch_v1", "conch_v15", "uni_v1", "uni_v2", "ctranspath", "phikon", "phikon_v2", "resnet50", "keep", "gigapath",
    "virchow", "virchow2", "hoptimus0", "hoptimus1", "h0-mini", "musk", "openmidnight", "gpfm", "hibou_l",
    "kaiko-vitb8", "kaiko-vitb16", "kaiko-vits8", "kaiko-vits16", "kaiko-vitl14", "lunit-vits8", "midnight12k",
    "genbio-pathfm", "gemma4-e4b", "gemma4-26b"})
STAMP_NAMES = frozenset({
    "ctranspath", "chief-ctranspath", "conch", "conch1_5", "uni", "uni2", "dino-bloom", "gigapath", "h-optimus-0",
    "h-optimus-1", "virchow", "virchow-full", "virchow2", "musk", "mstar", "plip", "keep", "ticon", "empty",
    "red-dino"})

# mmcli name -> (TRIDENT name, STAMP name); None: that peer has no extractor with these features
PEERS: dict[str, tuple[str | None, str | None]] = {
    "uni": ("uni_v1", "uni"),
    "uni2-h": ("uni_v2", "uni2"),
    "virchow": ("virchow", "virchow-full"),  # both 2560-d CLS + mean of all patch tokens
    "virchow2": ("virchow2", "virchow2"),  # STAMP: the CLS half
    "h-optimus-0": ("hoptimus0", "h-optimus-0"),
    "h-optimus-1": ("hoptimus1", "h-optimus-1"),
    "prov-gigapath": ("gigapath", "gigapath"),
    "phikon-v2": ("phikon_v2", None),
    "conch-v1": ("conch_v1", "conch"),
    "conch-v1.5": ("conch_v15", "conch1_5"),
    "ctranspath": (None, "ctranspath"),
    "chief-ctranspath": ("ctranspath", "chief-ctranspath"),
    "resnet50_trunc": ("resnet50", None),  # TRIDENT's resnet50: layer3 of resnet50.tv_in1k, average-pooled
    "musk": ("musk", "musk"),
    "keep": ("keep", "keep"),
    "phikon": ("phikon", None),
    "hibou_l": ("hibou_l", None),
    "gpfm": ("gpfm", None),
    "h0-mini": ("h0-mini", None),
    "dino-bloom": (None, "dino-bloom"),
    "mstar": (None, "mstar"),
    "plip": (None, "plip"),
    "ticon": (None, "ticon"),
    "red-dino": (None, "red-dino"),
}
STAMP_CLS_WIDTH = {"virchow2": 1280}  # STAMP name -> its feature width when mmcli's is CLS + mean (2 x this)
# older spellings that files in the wild carry (STAMP before 2025-06, mmcli exports before this module)
LEGACY = {"h_optimus_0": "h-optimus-0", "h_optimus_1": "h-optimus-1", "chief_ctranspath": "chief-ctranspath",
          "dino_bloom": "dino-bloom", "dinobloom": "dino-bloom", "virchow_full": "virchow-full",
          "conch_v1_5": "conch-v1.5", "conch1.5": "conch-v1.5", "uni2_h": "uni2-h", "prov_gigapath": "prov-gigapath",
          "hoptimus0": "h-optimus-0", "hoptimus1": "h-optimus-1", "uni_v1": "uni", "uni_v2": "uni2-h",
          "uni2": "uni2-h", "conch_v15": "conch-v1.5", "conch1_5": "conch-v1.5", "conch_v1": "conch-v1",
          "gigapath": "prov-gigapath", "virchow-full": "virchow", "phikon_v2": "phikon-v2", "red_dino": "red-dino"}
_HASH = re.compile(r"^[0-9a-fA-F]{6,}$")


def strip_hash(name: str) -> str:
    """STAMP's ``_resolve_extractor_name``: ``uni-abc123`` -> ``uni`` (only a hex suffix of 6+ digits)."""
    base, sep, suffix = name.strip().rpartition("-")
    return base if sep and _HASH.match(suffix) else name.strip()


_FROM_TRIDENT = {t: m for m, (t, _) in PEERS.items() if t}
_FROM_STAMP = {st: m for m, (_, st) in PEERS.items() if st}


def canonical(name: str | None, origin: str | None = None) -> str | None:
    """mmcli's name of an encoder named ``name`` in the vocabulary of ``origin`` (``trident``, ``stamp``, or None
    for mmcli's own / unknown); the name itself when no peer knows it."""
    if not name:
        return None
    n = strip_hash(str(name))
    if origin == "stamp" and n in ("virchow", "virchow2"):
        return f"{n}-cls"  # STAMP's Virchow CLS tokens (1280-d): no mmcli preset gives exactly these
    own = {"trident": _FROM_TRIDENT, "stamp": _FROM_STAMP}.get(origin or "", {})
    if n in own:
        return own[n]
    if n in PEERS:
        return n
    low = n.lower()
    for cand in dict.fromkeys((low, low.replace("-", "_"), low.replace("_", "-"))):
        if cand in PEERS:
            return cand
        if cand in LEGACY:
            return LEGACY[cand]
    for table in (_FROM_TRIDENT, _FROM_STAMP):
        if low in table:
            return table[low]
    return n


def _peer_name(name: str | None, origin: str | None, column: int, known: frozenset[str]) -> str | None:
    c = canonical(name, origin)
    if not c:
        return None
    if c.endswith("-cls"):  # STAMP's Virchow CLS tokens: only STAMP has features like these
        mapped = c.removesuffix("-cls") if column == 1 else None
    else:
        mapped = PEERS.get(c, (None, None))[column]
    if mapped:
        return mapped
    fallback = c if c in PEERS else strip_hash(str(name))
    # the peer's own word for other features (TRIDENT's ctranspath is CHIEF's) must not name these: refused
    return None if fallback in known or c.removesuffix("-cls") in known else fallback


def trident_name(name: str | None, origin: str | None = None) -> str | None:
    """TRIDENT's folder name (``features_<name>``) for these features; the store's own name when TRIDENT has no
    model of that name (its slide encoders will not take them), None when TRIDENT's word would mean other
    features (mmcli's ``ctranspath`` is not TRIDENT's, which loads CHIEF's weights)."""
    return _peer_name(name, origin, 0, TRIDENT_NAMES)


def stamp_name(name: str | None, origin: str | None = None) -> str | None:
    """STAMP's extractor name for these features (a 2560-d virchow2 is exported as STAMP's 1280-d CLS
    ``virchow2``); the store's own name when STAMP has none of that name, None when STAMP's word would mean
    other features."""
    return _peer_name(name, origin, 1, STAMP_NAMES)
