"""VCF ingest: variant calls -> a patients x genes (or regions, or loci) table of alt-allele dosages.

Read with cyvcf2 (htslib). Conventions:

- **samples are patient ids**, validated like the manifest's (safe characters); a sample found in two files
  is refused. Multi-sample VCFs and per-patient VCFs (a glob) both work, plain text (``.vcf``), gzip or bgzip
  (``.vcf.gz``) or BCF: without ``--regions`` each file is read once from start to end, so no index is needed;
  ``--regions`` queries the index (``.tbi`` or ``.csi`` beside a bgzipped file), and a file without one is
  named (exit 2) with the command that makes it;
- a value is the **alt-allele dosage**: the number of non-reference alleles of the genotype (0, 1, 2 for a
  diploid call; multi-allelic sites count every alt allele);
- a **missing genotype** (``./.``) is NaN; a gene / region sum over its variants is NaN for a patient with a
  missing genotype at any of them (the count is unknown), imputed in-fold at fit time like any missing value;
- a variant that is absent from a patient's own (per-patient) VCF counts 0 for that patient: a variant-only
  VCF lists non-reference sites (without gVCF reference blocks this assumes the site was callable);
- columns: ``--regions BED`` -> one per BED line (its name, or ``chrom:start-end``); ``--genes LIST`` -> one
  per gene, variants assigned by their annotation (snpEff ``ANN``, VEP ``CSQ`` ``SYMBOL``, or ``GENE``
  INFO fields); neither -> one per locus ``chrom:pos:ref:alt``.
"""
from __future__ import annotations

import glob as _glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli.pipeline.errors import InputError
from mmcli.pipeline.fingerprint import source_fingerprint
from mmcli.pipeline.ids import check_id, id_problem

GENE_FIELDS = ("ANN", "CSQ", "GENE")


def vcf_files(spec: str | Path) -> list[Path]:
    """The VCF files of a path or glob, sorted; none is an InputError."""
    text = str(spec)
    paths = sorted(Path(p) for p in _glob.glob(text)) if any(c in text for c in "*?[") else [Path(text)]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise InputError(f"--vcf {text}: no such file. Fix: a .vcf.gz path or a glob such as 'calls/*.vcf.gz'.")
    return paths


def _open(path: Path, indexed: bool = False) -> Any:
    """An open cyvcf2 reader of ``path``; ``indexed``: the caller queries regions, so an index must exist."""
    from cyvcf2 import VCF

    if indexed and not any(Path(f"{path}{ext}").is_file() for ext in (".tbi", ".csi")):
        plain = not path.name.endswith((".gz", ".bgz", ".bcf"))
        raise InputError(f"{path}: --regions needs an indexed VCF and there is no {path.name}.tbi or .csi. Fix: "
                         + (f"`bgzip {path.name} && tabix -p vcf {path.name}.gz`" if plain else
                            f"`tabix -p vcf {path.name}` (or `bcftools index -t`; a plain-gzip file must be "
                            "recompressed with bgzip first)")
                         + ", or leave out --regions to read the file from start to end.")
    try:
        vcf = VCF(str(path), gts012=False, lazy=True)
        _ = vcf.raw_header
    except Exception as e:  # cyvcf2 raises OSError / Exception with htslib's message
        raise InputError(f"{path}: not a readable VCF ({e}). Fix: check the file is a bgzipped VCF.") from None
    return vcf


def _dosage(variant: Any) -> np.ndarray:
    """(n_samples,) float: alt alleles of each genotype, NaN where any allele is missing."""
    gt = variant.genotype.array()[:, :-1]  # last column is the phase flag
    called = gt != -2  # -2 pads lower-ploidy genotypes
    missing = ((gt == -1) & called).any(axis=1) | ~called.any(axis=1)
    out = ((gt > 0) & called).sum(axis=1).astype(np.float64)
    out[missing] = np.nan
    return out


def _genes_of(variant: Any, csq_symbol: int | None) -> set[str]:
    genes: set[str] = set()
    ann = variant.INFO.get("ANN")
    if ann:
        genes |= {a.split("|")[3] for a in str(ann).split(",") if len(a.split("|")) > 3}
    csq = variant.INFO.get("CSQ")
    if csq and csq_symbol is not None:
        genes |= {c.split("|")[csq_symbol] for c in str(csq).split(",") if len(c.split("|")) > csq_symbol}
    gene = variant.INFO.get("GENE")
    if gene:
        genes |= {g for g in str(gene).split(",")}
    return {g for g in genes if g}


def _csq_symbol(vcf: Any) -> int | None:
    try:
        desc = vcf.get_header_type("CSQ")["Description"]
    except KeyError:
        return None
    fields = desc.split("Format:")[-1].strip().strip('"').split("|")
    return fields.index("SYMBOL") if "SYMBOL" in fields else None


def read_bed(path: str | Path) -> list[tuple[str, int, int, str]]:
    """BED regions ``(chrom, start0, end, name)``; the name defaults to ``chrom:start-end``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--regions {path}: no such file.")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        f = line.split("\t") if "\t" in line else line.split()
        try:
            chrom, start, end = f[0], int(f[1]), int(f[2])
        except (IndexError, ValueError):
            raise InputError(f"{path}: line {i}: expected 'chrom start end [name]' (tab-separated, 0-based "
                             "start).") from None
        if end <= start or start < 0:
            raise InputError(f"{path}: line {i}: end {end} must be > start {start} >= 0.")
        out.append((chrom, start, end, f[3] if len(f) > 3 and f[3] else f"{chrom}:{start}-{end}"))
    if not out:
        raise InputError(f"{path}: no regions.")
    return out


def parse_genes(spec: str) -> list[str]:
    """``--genes``: a comma list, or a file with one gene per line."""
    p = Path(spec)
    items = p.read_text().split() if p.is_file() else spec.split(",")
    genes = list(dict.fromkeys(g.strip() for g in items if g.strip()))
    if not genes:
        raise InputError(f"--genes {spec!r}: no gene names. Fix: e.g. --genes TP53,BRCA1,KRAS.")
    return genes


def _samples(vcf: Any, path: Path) -> list[str]:
    samples = list(vcf.samples)
    if not samples:
        raise InputError(f"{path}: no samples (a sites-only VCF). Fix: a VCF with genotype columns, one per patient.")
    for s in samples:
        problem = id_problem(s)
        if problem:
            raise InputError(f"{path}: sample {s!r} is not a usable patient id: {problem}. Fix: rename it "
                             "(bcftools reheader) to the patient id of the manifest.")
    return samples


def _file_columns(vcf: Any, regions: list[tuple[str, int, int, str]] | None, genes: list[str] | None
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(column, dosages of this file's samples) for every variant-to-column assignment of one VCF."""
    if regions is not None:
        for chrom, start, end, name in regions:
            for v in vcf(f"{chrom}:{start + 1}-{end}"):
                if v.start < end and v.end > start:
                    yield name, _dosage(v)
        return
    wanted = set(genes) if genes is not None else None
    sym = _csq_symbol(vcf)
    for v in vcf:
        if wanted is None:
            for k, alt in enumerate(v.ALT or ["."]):
                d = _dosage(v) if len(v.ALT or []) <= 1 else _allele_dosage(v, k + 1)
                yield f"{v.CHROM}:{v.POS}:{v.REF}:{alt}", d
        else:
            for g in _genes_of(v, sym) & wanted:
                yield g, _dosage(v)


def _allele_dosage(variant: Any, allele: int) -> np.ndarray:
    """Copies of one alt allele (per-locus columns of a multi-allelic site)."""
    gt = variant.genotype.array()[:, :-1]
    called = gt != -2
    out = (gt == allele).sum(axis=1).astype(np.float64)
    out[((gt == -1) & called).any(axis=1)] = np.nan
    return out


def vcf_matrix(paths: Sequence[Path], regions: list[tuple[str, int, int, str]] | None = None,
               genes: list[str] | None = None) -> pd.DataFrame:
    """Patients x columns dosage table of ``paths`` (see module docstring), index ``patient_id``."""
    per_file: list[pd.DataFrame] = []
    owner: dict[str, Path] = {}
    annotated = False
    for path in paths:
        vcf = _open(path, indexed=regions is not None)
        samples = _samples(vcf, path)
        for s in samples:
            if s in owner:
                raise InputError(f"{path}: sample {s!r} is also in {owner[s]}. Fix: one VCF column per patient.")
            owner[s] = path
        if genes is not None:
            annotated |= any(vcf.contains(f) for f in GENE_FIELDS)
        sums: dict[str, np.ndarray] = {}
        try:
            for col, d in _file_columns(vcf, regions, genes):
                sums[col] = sums[col] + d if col in sums else d.copy()
        except InputError:
            raise
        except Exception as e:  # htslib: truncated / corrupt record, region on an unknown contig
            raise InputError(f"{path}: cannot read the VCF ({e}). Fix: check the file (bcftools view).") from None
        finally:
            vcf.close()
        per_file.append(pd.DataFrame(sums, index=pd.Index(samples, name="patient_id"), dtype=np.float64))
    if genes is not None and not annotated:
        raise InputError(f"--genes needs variants annotated with a gene (INFO {'/'.join(GENE_FIELDS)}); "
                         f"{[str(p) for p in paths][:3]} have none. Fix: annotate (snpEff, VEP) or pass "
                         "--regions BED with the genes' coordinates.")
    table = pd.concat(per_file, axis=0, sort=False)
    # a column absent from a file = no such variant in its samples -> 0 (NaN from missing genotypes is kept)
    present_cols = {c for f in per_file for c in f.columns}
    for f in per_file:
        absent = present_cols - set(f.columns)
        table.loc[f.index, list(absent)] = 0.0
    order = ([r[3] for r in regions] if regions is not None else genes if genes is not None
             else sorted(present_cols, key=_locus_key))
    order = list(dict.fromkeys(order))
    table = table.reindex(columns=order).astype(np.float64)
    if regions is not None or genes is not None:
        table = table.fillna({c: 0.0 for c in order if c not in present_cols})
    return table


def _locus_key(col: str) -> tuple[str, int, str]:
    chrom, pos, rest = col.split(":", 2)
    return chrom, int(pos), rest


def ingest_vcf(vcf: str | Path, name: str, store: str | Path, genes: str | None = None,
               regions: str | Path | None = None) -> dict[str, Any]:
    """Read ``vcf`` (file or glob) and write the dosage table to ``/tabular/<name>`` of ``store``."""
    from mmcli.pipeline.store import open_store

    if genes and regions:
        raise InputError("--genes and --regions: give one of them (or neither, for one column per locus).")
    check_id(name, "--name")
    paths = vcf_files(vcf)
    bed = read_bed(regions) if regions else None
    gene_list = parse_genes(genes) if genes else None
    table = vcf_matrix(paths, bed, gene_list)
    if table.shape[1] == 0:
        raise InputError(f"--vcf {vcf}: no variants{' in the regions' if bed else ''}; nothing to store.")
    missing = float(table.isna().to_numpy().mean())
    attrs = {
        "source": [str(p.resolve()) for p in paths],
        "source_fingerprint": {str(p): source_fingerprint(p) for p in paths},
        "kind": "vcf_dosage", "columns_are": "regions" if bed else "genes" if gene_list else "loci",
        "value": "alt-allele dosage (sum over the column's variants); NaN = missing genotype",
        "missing_fraction": round(missing, 6),
        "note": "raw values: no scaling or imputation at ingest (done in-fold at fit time)",
    }
    open_store(store, "a").write_table(name, table, attrs)
    return {"name": name, "store": str(store), "patients": int(table.shape[0]), "features": int(table.shape[1]),
            "files": len(paths), "missing_fraction": missing}
