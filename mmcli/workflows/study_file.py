"""The study file of ``mmcli run study.yaml``: one typed, validated YAML file for a whole study (STAMP's
``config.yaml`` idea), checked against the same Options models as the CLI flags.

Layout (every key optional unless marked; ``mmcli run --check FILE`` prints the file resolved)::

    out: results                       # required; relative paths are relative to the study file's folder
    cohort:                            # required: synth, or manifest + labels (+ tables)
      synth: {patients: 120, seed: 0}  #   a synthetic cohort written to OUT/cohort (mmcli synth)
      manifest: data/manifest.csv      #   or your files
      labels: data/labels.csv
      tables: {genes: data/genes.csv, clinical: {table: data/clinical.csv, categorical: [site]}}
    store: features.zarr               # relative to out (default features.zarr)
    extract:                           # one entry per modality, keys = that modality's extract flags
      - {modality: wsi, encoder: resnet50_trunc, mpp: 0.5}   # + force, scheduler, workers
    fit_defaults: {folds: 5, seed: 0}  # merged into every fit (a fit's own keys win)
    fits:                              # keys = mmcli fit's options (FitOptions), + name and report
      - {name: abmil, head: attention_mil, target: subtype, params: {epochs: 30}}
      - {name: cox, head: cox, time: time, event: event, evidence: {subgroups: age}}
    compare: [{a: fusion, b: xgb}]     # mmcli compare of two fits (n_boot, seed, alpha)
    ablations:                         # mmcli ablate, into OUT/<name>
      - {name: ablation, target: subtype, subsets: singles+all, fusions: [concat], n_boot: 200}
    reports: {attention_patients: 3, top_tiles: 8, card: false}   # every fit gets OUT/runs/<name>/report.html
    exports:
      qupath: [{run: abmil}]           # the slide with the most tiles, with its attention, as QuPath GeoJSON
      heatmaps: [{run: abmil, ...}]    # high-resolution attention heatmaps (PNG + pyramidal TIFF)

Validation happens once, before any work: an unknown key is refused with its path (``fits[1].parms: unknown
key; did you mean params?``), a bad value with its path and what the key takes (the Options models' own
descriptions), a head parameter by its head's Params model. Outputs: fits in ``OUT/runs/<name>``, ablations in
``OUT/<name>``, comparisons in ``OUT/compare``, exports in ``OUT/qupath`` and ``OUT/heatmaps``.

:func:`resolved_doc` writes the study back with every default filled in and every path absolute; it is saved
as ``OUT/study.yaml`` and into every run folder, so a result can be replayed exactly with
``mmcli run OUT/runs/<name>/study.yaml --only <name>`` (reading a resolved file gives the same study again).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.ids import id_problem

STUDY_FORMAT = 1
FIT_KEYS_SET_BY_STUDY = ("store", "labels", "out")  # a fit may still give store or labels of its own
SUBSETS = ("default", "singles+all")


class StudyError(InputError):
    """A study file that cannot be read or does not validate; the message names the file and each key's path."""


class Part(BaseModel):
    """A block of the study file: unknown keys refused, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _safe(v: str) -> str:
    problem = id_problem(v)
    if problem:
        raise ValueError(f"{problem} (a name becomes a folder: letters, digits, '.', '_', '-')")
    return v


class SynthSpec(Part):
    patients: int = Field(120, ge=8, le=100_000, description="patients of the synthetic cohort, 8..100000")
    seed: int = Field(0, ge=0, description="seed of the synthetic cohort, >= 0")


class TableSpec(Part):
    table: Path = Field(..., description="CSV: patient_id + feature columns")
    id_column: str = Field("patient_id", description="the patient id column")
    categorical: list[str] | None = Field(None, description="columns to treat as categorical")


class CohortSpec(Part):
    synth: SynthSpec | None = Field(None, description="a synthetic cohort written to OUT/cohort")
    manifest: Path | None = Field(None, description="cohort manifest CSV: patient_id,modality,path[,item_id]")
    labels: Path | None = Field(None, description="labels CSV: patient_id + outcome columns")
    tables: dict[str, TableSpec] = Field(default_factory=dict, description="NAME: CSV (or {table, id_column, "
                                         "categorical}) of tables to load into the store")

    @field_validator("tables", mode="before")
    @classmethod
    def _plain_paths(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"table": t} if isinstance(t, (str, Path)) else t for k, t in v.items()}
        return v

    @field_validator("tables")
    @classmethod
    def _table_names(cls, v: dict[str, TableSpec]) -> dict[str, TableSpec]:
        for name in v:
            _safe(name)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> CohortSpec:
        if (self.synth is None) == (self.manifest is None):
            raise ValueError("give either synth: {patients, seed} or manifest: (with labels:)")
        if self.manifest is not None and self.labels is None:
            raise ValueError("manifest: needs labels: (the labels CSV)")
        if self.synth is not None and (self.labels is not None or self.tables):
            raise ValueError("synth: writes its own labels and tables; leave out labels: and tables:")
        return self


class CompareSpec(Part):
    a: str = Field(..., description="name of a fit")
    b: str = Field(..., description="name of another fit")
    n_boot: int = Field(2000, ge=1, le=100_000, description="bootstrap resamples, 1..100000")
    seed: int = Field(0, ge=0, description="seed of the resamples")
    alpha: float = Field(0.05, gt=0, lt=1, description="level of the tests, in (0, 1)")


class AblationSpec(Part):
    name: str = Field(..., description="the ablation's folder under out")
    target: str | None = Field(None, description="classification target column")
    time: str | None = Field(None, description="survival time column (with event)")
    event: str | None = Field(None, description="survival event column: 1 = observed, 0 = censored")
    modalities: list[str] | None = Field(None, description="modalities and tables to combine (default: all in "
                                         "the store)")
    subsets: Literal["default", "singles+all"] | list[list[str]] = Field(
        "default", description="default (singles, pairs and all) | singles+all (each modality alone and all "
        "together: one pre-specified comparison) | a list of subsets, e.g. [[wsi], [wsi, genes]]")
    max_subset_size: int | None = Field(None, ge=1, description="every subset up to this many modalities")
    fusions: list[str] | None = Field(None, description="fusion operators (default: all)")
    heads: list[str] = Field(["fusion_mlp"], description="heads to fit")
    params: dict[str, Any] = Field(default_factory=dict, description="head parameters (--param)")
    encoders: dict[str, str] = Field(default_factory=dict, description="MODALITY: ENCODER_ID")
    folds: int = Field(5, ge=2, le=100, description="cross-validation folds, 2..100")
    seed: int = Field(0, ge=0, description="seed of splits, models and resamples")
    metric: str | None = Field(None, description="metric of the table (default: auroc / c_index)")
    n_boot: int = Field(1000, ge=1, le=100_000, description="bootstrap resamples of the CIs")
    drop_unmatched: bool = Field(True, description="fit each subset on the patients that have it")
    compare_best: bool = Field(True, description="test the best fused against the best single subset")
    force: bool = Field(False, description="refit runs that already exist")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe(v)

    @model_validator(mode="after")
    def _task(self) -> AblationSpec:
        survival = self.time is not None or self.event is not None
        if (self.target is not None) == survival or (survival and (self.time is None or self.event is None)):
            raise ValueError("give either target: (classification) or both time: and event: (survival)")
        return self


class ReportSpec(Part):
    attention_patients: int = Field(3, ge=0, description="patients with attention heatmaps in each report")
    top_tiles: int = Field(8, ge=0, description="top-attention tiles shown per slide")
    card: bool = Field(False, description="also write model_card.md / .json into every run")


class QupathSpec(Part):
    run: str = Field(..., description="a fit with attention (its slide with the most tiles is exported)")


class HeatmapSpec(Part):
    run: str = Field(..., description="a fit with attention.csv")
    patients: list[str] | None = Field(None, description="patients to export (default: the report's showcase)")
    options: dict[str, Any] = Field(default_factory=dict, description="HeatmapOptions: mpp, overlap, region, "
                                    "formats, ... (the flags of mmcli export --format heatmap)")


class ExportsSpec(Part):
    qupath: list[QupathSpec] = Field(default_factory=list)
    heatmaps: list[HeatmapSpec] = Field(default_factory=list)


class StudySpec(Part):
    """The study file as written (the blocks that the Options models of the CLI check are kept raw here and
    validated by :func:`resolve`)."""

    format: int = Field(STUDY_FORMAT, description=f"study file format, {STUDY_FORMAT}")
    out: Path = Field(..., description="folder of every output")
    cohort: CohortSpec
    store: Path = Field(Path("features.zarr"), description="feature store, relative to out")
    extract: list[dict[str, Any]] = Field(default_factory=list, description="one entry per modality")
    fit_defaults: dict[str, Any] = Field(default_factory=dict, description="keys merged into every fit")
    fits: list[dict[str, Any]] = Field(default_factory=list, description="one entry per fit")
    compare: list[CompareSpec] = Field(default_factory=list)
    ablations: list[AblationSpec] = Field(default_factory=list)
    reports: ReportSpec = Field(default_factory=ReportSpec)
    exports: ExportsSpec = Field(default_factory=ExportsSpec)


# ---- resolved ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractStep:
    modality: str
    options: Any  # the modality's validated Options model
    force: bool = False
    scheduler: str | None = None
    workers: int | None = None


@dataclass(frozen=True)
class FitStep:
    name: str
    options: Any  # FitOptions
    report: bool = True


@dataclass(frozen=True)
class Study:
    """A validated study, every path absolute."""

    source: Path | None
    out: Path
    cohort: CohortSpec
    store: Path
    extract: list[ExtractStep]
    fits: list[FitStep]
    compare: list[CompareSpec]
    ablations: list[AblationSpec]
    reports: ReportSpec
    exports: ExportsSpec
    fit_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def cohort_dir(self) -> Path:
        return self.out / "cohort"

    @property
    def labels(self) -> Path:
        return self.cohort.labels if self.cohort.labels is not None else self.cohort_dir / "labels.csv"

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def names(self) -> list[str]:
        return ([f.name for f in self.fits] + [a.name for a in self.ablations]
                + [f"{c.a}-vs-{c.b}" for c in self.compare])


# ---- errors with key paths -------------------------------------------------------------------------------------
def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "(top)"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys the model at ``loc`` (a nested Part) takes, to name them for an unknown key."""
    import typing

    cur: Any = model
    for x in loc:
        if isinstance(x, int) or cur is None:
            continue
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            f = cur.model_fields.get(str(x))
            if f is None:
                return None
            ann = f.annotation
            models = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
            for a in typing.get_args(ann):
                models += [b for b in typing.get_args(a) if isinstance(b, type) and issubclass(b, BaseModel)]
            cur = models[0] if models else None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [k for k in cur.model_fields if k != "flag_prefix"]
    return None


def unknown_key(path: str, key: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return (f"{path}: unknown key" + (f"; did you mean {near[0]}?" if near else "")
            + f" (keys here: {', '.join(allowed)})")


def explain(e: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per error: the key's path, what is wrong, what the key takes."""
    lines = []
    for err in e.errors():
        loc = tuple(err.get("loc", ()))
        where = _path(prefix, loc)
        if err.get("type") == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1]) or []
            lines.append(unknown_key(where, str(loc[-1]), allowed) if allowed else f"{where}: unknown key")
            continue
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        got = err.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) and err["type"] != "missing" else ""
        lines.append(f"{where}: {msg}{shown}")
    return lines


# ---- loading -----------------------------------------------------------------------------------------------------
def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror or e}).") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StudyError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None
    if not isinstance(doc, dict):
        raise StudyError(f"{path}: a study file is a YAML mapping (out:, cohort:, fits:, ...), got "
                         f"{type(doc).__name__}.")
    return doc


def _abs(p: Path | None, base: Path) -> Path | None:
    if p is None:
        return None
    p = Path(p).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _extract_step(i: int, entry: Any, errors: list[str]) -> ExtractStep | None:
    from mmcli.features.modalities import MODALITIES

    where = f"extract[{i}]"
    if not isinstance(entry, dict) or "modality" not in entry:
        errors.append(f"{where}: an entry is a mapping with modality: (wsi, mri, text, ...) and that modality's "
                      "extract options")
        return None
    entry = dict(entry)
    modality = str(entry.pop("modality"))
    try:
        mod = MODALITIES.get(modality)
    except InputError as e:
        errors.append(f"{where}.modality: {e}")
        return None
    run = {k: entry.pop(k) for k in ("force", "scheduler", "workers") if k in entry}
    allowed = [f for f in mod.options.fields()]
    bad = [k for k in entry if k not in allowed]
    for k in bad:
        errors.append(unknown_key(f"{where}.{k}", k, ["modality", "force", "scheduler", "workers", *allowed]))
    if bad:
        return None
    try:
        options = mod.options(**{**mod.implied_options(entry), **entry})
    except ValidationError as e:
        errors += explain(e, mod.options, where)
        return None
    except InputError as e:
        errors.append(f"{where}: {e}")
        return None
    force, workers = run.get("force", False), run.get("workers")
    if not isinstance(force, bool) or (workers is not None and (not isinstance(workers, int) or workers < 1)):
        errors.append(f"{where}: force: true|false, workers: an integer >= 1")
        return None
    return ExtractStep(mod.name, options, force, run.get("scheduler"), workers)


def _fit_step(i: int, entry: Any, defaults: dict[str, Any], study_labels: Path, store: Path, out: Path,
              base: Path, errors: list[str]) -> FitStep | None:
    from mmcli.heads.registry import HEADS
    from mmcli.heads.training.options import HEAD_FLAGS, FitOptions, build_fit_options

    where = f"fits[{i}]"
    if not isinstance(entry, dict):
        errors.append(f"{where}: a fit is a mapping (name:, head:, target: or time:/event:, ...)")
        return None
    merged = {**defaults, **entry}
    name = merged.pop("name", None)
    report = merged.pop("report", True)
    if not isinstance(name, str) or id_problem(name):
        errors.append(f"{where}.name: required, a folder name of letters, digits, '.', '_', '-' (got {name!r})")
        return None
    allowed = ["name", "report", *[f for f in FitOptions.fields() if f != "out"], *HEAD_FLAGS]
    bad = [k for k in merged if k not in allowed or k == "out"]
    for k in bad:
        origin = where if k in entry else "fit_defaults"
        errors.append(unknown_key(f"{origin}.{k}", k, allowed))
    if bad:
        return None
    if isinstance(merged.get("head"), str):
        try:
            merged["head"] = HEADS.canonical(merged["head"])
        except InputError as e:
            errors.append(f"{where}.head: {e}")
            return None
    for key in ("store", "labels", "init"):
        if isinstance(merged.get(key), str):
            merged[key] = _abs(Path(merged[key]), base)
    given = {"overwrite": True, "store": store, "labels": study_labels, **merged, "out": out / "runs" / name}
    try:
        return FitStep(name, build_fit_options(given), bool(report))
    except InputError as e:
        errors.append(f"{where} ({name}): {e}")
        return None


def load_study(source: str | Path | dict[str, Any], *, out: str | Path | None = None,
               base: str | Path | None = None) -> Study:
    """Read and validate a study (a YAML file, or its content as a dict); every problem at once, each with its
    key's path, as one :class:`StudyError`. ``out`` overrides the file's ``out`` (relative to the current
    folder); ``base`` is the folder relative paths refer to (default: the file's folder, else the current one)."""
    path = Path(source) if not isinstance(source, dict) else None
    doc = read_yaml(path) if path is not None else dict(source)
    where = str(path) if path is not None else "study"
    base_dir = Path(base).resolve() if base is not None else (path.parent.resolve() if path else Path.cwd())
    if out is not None:
        doc["out"] = str(Path(out).expanduser().resolve())
    try:
        spec = StudySpec.model_validate(doc)
    except ValidationError as e:
        raise StudyError(f"{where}: " + "; ".join(explain(e, StudySpec))) from None
    if spec.format != STUDY_FORMAT:
        raise StudyError(f"{where}: format {spec.format}: this mmcli reads study format {STUDY_FORMAT}.")
    out_dir = _abs(spec.out, base_dir)
    assert out_dir is not None
    cohort = spec.cohort.model_copy(update={
        "manifest": _abs(spec.cohort.manifest, base_dir), "labels": _abs(spec.cohort.labels, base_dir),
        "tables": {k: t.model_copy(update={"table": _abs(t.table, base_dir)}) for k, t in spec.cohort.tables.items()}})
    store = _abs(spec.store, out_dir)
    assert store is not None
    labels = cohort.labels if cohort.labels is not None else out_dir / "cohort" / "labels.csv"
    errors: list[str] = []
    extract = [s for i, e in enumerate(spec.extract) if (s := _extract_step(i, e, errors)) is not None]
    fits = [s for i, e in enumerate(spec.fits)
            if (s := _fit_step(i, e, spec.fit_defaults, labels, store, out_dir, base_dir, errors)) is not None]
    names = [f.name for f in fits] + [a.name for a in spec.ablations]  # declared names: one error per cause
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"fits/ablations: the name {dup!r} is used twice (each is a folder)")
    fit_names = {f.get("name") for f in spec.fits if isinstance(f, dict) and isinstance(f.get("name"), str)}
    for i, c in enumerate(spec.compare):
        errors += [f"compare[{i}].{k}: no fit named {v!r} (fits: {sorted(fit_names)})"
                   for k, v in (("a", c.a), ("b", c.b)) if v not in fit_names]
    for kind, items in (("qupath", spec.exports.qupath), ("heatmaps", spec.exports.heatmaps)):
        errors += [f"exports.{kind}[{i}].run: no fit named {e.run!r} (fits: {sorted(fit_names)})"
                   for i, e in enumerate(items) if e.run not in fit_names]
    errors += _check_heatmaps(spec.exports.heatmaps)
    if errors:
        raise StudyError(f"{where}: " + "; ".join(errors))
    return Study(path.resolve() if path else None, out_dir, cohort, store, extract, fits, list(spec.compare),
                 list(spec.ablations), spec.reports, spec.exports, dict(spec.fit_defaults))


def _check_heatmaps(items: list[HeatmapSpec]) -> list[str]:
    """Each heatmap export's options, validated by the export's own Options model."""
    if not items:
        return []
    from mmcli.stages.heatmap import HeatmapOptions

    out = []
    for i, h in enumerate(items):
        try:
            HeatmapOptions(**h.options)
        except ValidationError as e:
            out += explain(e, HeatmapOptions, f"exports.heatmaps[{i}].options")
    return out


# ---- writing back ------------------------------------------------------------------------------------------------
def _fit_doc(step: FitStep) -> dict[str, Any]:
    from mmcli.heads.base import RUN_PARAMS

    doc = step.options.to_json()
    doc.pop("out", None)
    doc["params"] = {k: v for k, v in (doc.get("params") or {}).items() if k not in RUN_PARAMS}
    doc["evidence"] = {k: v for k, v in (doc.get("evidence") or {}).items() if k != "flag_prefix"}
    doc["store"] = str(Path(doc["store"]).resolve())
    return {"name": step.name, **doc, "report": step.report}


def resolved_doc(study: Study) -> dict[str, Any]:
    """The study with every default filled in and every path absolute (what :func:`load_study` reads back to the
    same study)."""
    def part(p: BaseModel) -> Any:
        return p.model_dump(mode="json")

    cohort = part(study.cohort)
    cohort = {k: v for k, v in cohort.items() if v not in (None, {})}
    return {
        "format": STUDY_FORMAT,
        "out": str(study.out),
        "cohort": cohort,
        "store": str(study.store),
        "extract": [{"modality": s.modality, "force": s.force, "scheduler": s.scheduler, "workers": s.workers,
                     **s.options.to_json()} for s in study.extract],
        "fits": [_fit_doc(f) for f in study.fits],
        "compare": [part(c) for c in study.compare],
        "ablations": [part(a) for a in study.ablations],
        "reports": part(study.reports),
        "exports": part(study.exports),
    }


def write_resolved(study: Study, path: Path, *, only: str | None = None) -> Path:
    """Write :func:`resolved_doc` to ``path`` (atomically), headed by how to replay it."""
    import yaml

    from mmcli import __version__
    from mmcli.pipeline.io import atomic_write_text

    replay = f"mmcli run {path}" + (f" --only {only}" if only else "")
    head = (f"# mmcli {__version__} study, resolved: every default filled in, every path absolute.\n"
            f"# Written from {study.source or '(a study given in code)'}. Replay: {replay}\n")
    return atomic_write_text(path, head + yaml.safe_dump(resolved_doc(study), sort_keys=False, allow_unicode=True,
                                                         width=110))
