"""``extract --modality slide``: slide embeddings from cached tile features, by a published slide encoder.

    mmcli extract --modality slide --encoder chief --weights CHIEF_pretraining.pth --manifest m.csv --store S

For every manifest row of ``--from-modality`` (``wsi``) whose tile features are in the store (under
``--tile-encoder-id``, default: the only encoder of that modality), the slide encoder (:mod:`~mmcli.features.
encoders.slide`) turns the (N, D) tile features into one (1, dim) row, stored as the ``slide`` modality with its
provenance (slide encoder, weights hash, licence, the tile encoder_id and tile count). Stage 2 reads it as a
vector: every head that takes vectors (xgboost, cox, fusion_mlp) uses it.

The tile features must be the slide encoder's own tile encoder's (CHIEF: CHIEF-CTransPath, MADELEINE: CONCH v1):
another named encoder or another width is refused (exit 2). Slides need not be reachable: each row's source is a
small descriptor of its tile item (``<store>.slide-sources/``, rewritten only when the tile item changes), so the
shared runner's cache, locks and resume work as for any file: a re-extracted tile item re-encodes its slide.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from mmcli.features.encoders.registry import create_encoder, resolve
from mmcli.features.interop import names
from mmcli.features.modalities import ExtractorOptions, coerce, register
from mmcli.features.runner import ExtractorSpec, ItemError, ItemExtractor, ItemResult, ProgressFn
from mmcli.pipeline.errors import InputError, StoreError
from mmcli.pipeline.fingerprint import make_encoder_id
from mmcli.pipeline.io import atomic_write_text
from mmcli.pipeline.manifest import Manifest, ManifestRow

MODALITY = "slide"


class SlideOptions(ExtractorOptions):
    """Options of ``extract --modality slide``. The slide encoder, its weights and the tile features it reads make
    the ``encoder_id``; device and threads do not (precision does, as for the tile encoders)."""

    encoder: str = Field(..., min_length=1, description="a slide encoder: chief | madeleine")
    weights: str | None = Field(None, description="the slide encoder's published checkpoint (CHIEF_pretraining.pth;"
                                " MADELEINE's model.pt with model_config.json beside it)")
    from_modality: str = Field("wsi", min_length=1, description="store modality of the tile features it reads")
    tile_encoder_id: str | None = Field(None, description="encoder_id of those tile features (default: the only "
                                        "encoder of --from-modality in the store)")

    @field_validator("weights", mode="before")
    @classmethod
    def _absolute(cls, v: Any) -> Any:
        """Absolute, so that dask workers in other folders find the same file."""
        return str(Path(v).expanduser().resolve()) if v else None


def sources_dir(store: str | Path) -> Path:
    p = Path(store).resolve()
    return p.with_name(p.name + ".slide-sources")


def _tile_encoder(store: str | Path, opts: SlideOptions) -> str:
    from mmcli.pipeline.store import open_store

    if not Path(store).exists():
        raise InputError(f"{store}: no such feature store; slide encoding reads the tile features cached there. "
                         "Fix: run extract --modality wsi first.")
    encs = open_store(store, "r").encoders(opts.from_modality)
    if opts.tile_encoder_id:
        if opts.tile_encoder_id not in encs:
            raise InputError(f"--tile-encoder-id {opts.tile_encoder_id}: not a {opts.from_modality} encoder of "
                             f"{store} (it has {encs}).")
        return opts.tile_encoder_id
    if len(encs) != 1:
        raise InputError(f"{store}: {len(encs)} {opts.from_modality} encoders {encs}. Fix: choose the tile features "
                         "with --tile-encoder-id." if encs else
                         f"{store}: no {opts.from_modality} features to encode. Fix: run extract --modality "
                         f"{opts.from_modality} first.")
    return encs[0]


def select_rows(manifest: Manifest, opts: SlideOptions, store: str) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """One row per manifest row of ``--from-modality`` (slide files need not exist), pointing at a descriptor of
    its cached tile item, written only when it changed (its fingerprint decides the cache)."""
    from mmcli.pipeline.store import open_store

    tile_eid = _tile_encoder(store, opts)
    st = open_store(store, "r")
    rows = sorted(manifest.for_modality(opts.from_modality) + manifest.missing_for(opts.from_modality),
                  key=lambda r: r.row)
    out = []
    for r in rows:
        state = st.item_state(opts.from_modality, tile_eid, r.patient_id, r.item_id)
        doc = {"modality": opts.from_modality, "encoder_id": tile_eid, "patient_id": r.patient_id,
               "item_id": r.item_id, "status": state.status, "why": state.why,
               "attrs_sha256": hashlib.sha256(json.dumps(state.attrs, sort_keys=True, default=str)
                                              .encode()).hexdigest()}
        path = sources_dir(store) / opts.from_modality / tile_eid / r.patient_id / f"{r.item_id}.json"
        text = json.dumps(doc, sort_keys=True, indent=1)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        out.append(ManifestRow(r.patient_id, MODALITY, path, r.item_id, r.row))
    return out, []


def check_tile_encoder(store: str | Path, opts: SlideOptions, tile_eid: str, enc: Any) -> dict[str, Any]:
    """The tile features must be what the slide encoder was trained on: same width, and the encoder they name
    (mmcli's preset, or a peer's name for imported features) one of its tile encoders. Returns what is recorded."""
    from mmcli.pipeline.store import open_store

    attrs = open_store(store, "r").encoder_attrs(opts.from_modality, tile_eid)
    m = enc.model
    origin = attrs.get("imported_from")
    raw = attrs.get("source_encoder") if origin else (attrs.get("preset") or attrs.get("encoder"))
    tile_name = names.canonical(str(raw), origin) if raw else None
    dim = attrs.get("dim")
    want = " / ".join(m.tile_encoders)
    if dim is not None and int(dim) != m.tile_dim:
        raise InputError(f"--encoder {m.name} reads {m.tile_dim}-d {want} tile features; /{opts.from_modality}/"
                         f"{tile_eid} holds {dim}-d {tile_name or 'features'}. Fix: extract them with --encoder "
                         f"{m.tile_encoders[0]} (or pass --tile-encoder-id of such features).")
    if tile_name and tile_name not in m.tile_encoders:
        raise InputError(f"--encoder {m.name} was trained on {want} tile features; /{opts.from_modality}/{tile_eid} "
                         f"holds {tile_name}'s. Fix: extract them with --encoder {m.tile_encoders[0]}.")
    return {"tile_encoder_id": tile_eid, "tile_modality": opts.from_modality, "tile_encoder": tile_name,
            "tile_encoder_checked": bool(tile_name)}


def _build(opts: SlideOptions) -> Any:
    modality, _, _ = resolve(opts.encoder)
    if modality != MODALITY:
        raise InputError(f"--encoder {opts.encoder!r} is a {modality} encoder, not a slide encoder (chief, "
                         "madeleine).")
    return create_encoder(opts.encoder, weights=opts.weights, device=opts.device,
                          precision=opts.precision)


@register("slide", options=SlideOptions, unit="slide", rows=select_rows)
def make_spec(store: str | Path, options: SlideOptions | None = None, *, cohort: Any = None,
              **given: Any) -> ExtractorSpec:
    """Validate the options, check the slide encoder's checkpoint and the tile features it reads, and return the
    picklable recipe; the ``encoder_id`` covers the slide encoder, its weights and the tile encoder_id."""
    opts: SlideOptions = coerce(options, SlideOptions, given)
    enc = _build(opts)
    tile_eid = _tile_encoder(store, opts)
    tile = check_tile_encoder(store, opts, tile_eid, enc)
    encoder_id = make_encoder_id(enc.name, enc.weights_sha256, {**enc.params(), "tiles": [opts.from_modality,
                                                                                          tile_eid]})
    kwargs = dict(options=opts.to_json(), store=str(Path(store).resolve()), encoder_id=encoder_id, tile=tile,
                  weights_sha256=enc.weights_sha256)
    return ExtractorSpec("mmcli.features.slide:SlideExtractor", kwargs, MODALITY, encoder_id)


class SlideExtractor(ItemExtractor):
    """A row's cached tile features -> its (1, dim) slide embedding."""

    modality = MODALITY

    def __init__(self, options: dict[str, Any], store: str, encoder_id: str, tile: dict[str, Any],
                 weights_sha256: str) -> None:
        self.options = opts = SlideOptions.from_json(options, context="slide extractor options")
        self.encoder = _build(opts)
        if self.encoder.weights_sha256 != weights_sha256:
            raise ItemError(f"--weights {opts.weights} changed since the run was planned (sha256 "
                            f"{self.encoder.weights_sha256} != {weights_sha256}).")
        self.store, self._id, self.tile = store, encoder_id, tile

    @property
    def encoder_id(self) -> str:
        return self._id

    def encoder_attrs(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "modality": MODALITY, "level": "slide", **self.tile,
                "options": self.options.to_json()}

    def extract(self, row: ManifestRow, progress: ProgressFn | None = None) -> ItemResult:
        from mmcli.pipeline.store import open_store

        src = json.loads(Path(row.path).read_text())
        where = f"/{src['modality']}/{src['encoder_id']}/{src['patient_id']}/{src['item_id']}"
        if src["status"] != "ok":
            raise ItemError(f"no cached tile features at {where} ({src['why'] or src['status']}). Fix: run extract "
                            f"--modality {src['modality']} for this slide first.")
        try:
            item = open_store(self.store, "r").read_item(src["modality"], src["encoder_id"], src["patient_id"],
                                                         src["item_id"])
        except StoreError as e:
            raise ItemError(str(e)) from e
        feats = item.features.astype(np.float32)
        if len(feats) == 0:
            raise ItemError(f"{where} has 0 tiles (no tissue): there is no slide to encode")
        if not np.isfinite(feats).all():
            raise ItemError(f"{where}: tile features hold NaN or inf. Fix: re-extract it (--force).")
        vec = self.encoder.encode(feats)
        if not np.isfinite(vec).all():
            raise ItemError(f"{self.encoder.name}: the slide embedding of {where} is not finite (precision "
                            f"{self.encoder.runtime()['precision']}). Fix: --precision fp32.")
        if progress:
            progress(1, 1)
        return ItemResult(vec.astype(np.float32), None, {"level": "slide", "n_tiles": int(len(feats)),
                                                         "tile_item": where, **self.encoder.runtime()})
