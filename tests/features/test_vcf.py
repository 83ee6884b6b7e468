"""VCF ingest: dosages per locus / gene / region from small bgzipped, tabix-indexed VCFs written here."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pysam
import pytest

from mmcli.features.vcf import ingest_vcf, vcf_files, vcf_matrix
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.store import open_store

HEADER = """##fileformat=VCFv4.2
##contig=<ID=chr1,length=100000>
##contig=<ID=chr2,length=100000>
##INFO=<ID=ANN,Number=.,Type=String,Description="Functional annotations: 'Allele | Annotation | Impact | Gene_Name'">
##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t{samples}
"""
# P1, P2, P3: TP53 has two variants (P2 missing at the second), KRAS one, chr2 a multi-allelic site
ROWS = [
    ("chr1", 100, "A", "G", "ANN=G|missense|MODERATE|TP53", ["0/1", "1/1", "0/0"]),
    ("chr1", 200, "C", "T", "ANN=T|stop_gained|HIGH|TP53", ["0/1", "./.", "0/0"]),
    ("chr1", 5000, "G", "A", "ANN=A|missense|MODERATE|KRAS", ["0/0", "0/1", "1/1"]),
    ("chr2", 300, "T", "C,G", ".", ["1/2", "0/2", "0/0"]),
]


def write_vcf(path, samples, rows):
    """Write, bgzip and tabix-index a VCF; returns the .vcf.gz path."""
    lines = [HEADER.format(samples="\t".join(samples))]
    for chrom, pos, ref, alt, info, gts in rows:
        lines.append("\t".join([chrom, str(pos), ".", ref, alt, ".", "PASS", info, "GT", *gts]) + "\n")
    path.write_text("".join(lines))
    return pysam.tabix_index(str(path), preset="vcf", force=True)


@pytest.fixture()
def multi(tmp_path):
    return write_vcf(tmp_path / "cohort.vcf", ["P1", "P2", "P3"], ROWS)


def test_loci_dosages_with_missing_genotype_and_multiallelic_sites(multi):
    t = vcf_matrix(vcf_files(multi))
    assert list(t.columns) == ["chr1:100:A:G", "chr1:200:C:T", "chr1:5000:G:A", "chr2:300:T:C", "chr2:300:T:G"]
    assert t.loc["P1"].tolist() == [1, 1, 0, 1, 1]
    assert np.isnan(t.loc["P2", "chr1:200:C:T"]) and t.loc["P2", "chr1:100:A:G"] == 2
    assert t.loc["P2", "chr2:300:T:G"] == 1 and t.loc["P2", "chr2:300:T:C"] == 0
    assert t.loc["P3"].tolist() == [0, 0, 2, 0, 0]


def test_gene_sums_from_annotations_missing_propagates(multi):
    t = vcf_matrix(vcf_files(multi), genes=["TP53", "KRAS", "EGFR"])
    assert list(t.columns) == ["TP53", "KRAS", "EGFR"]
    assert t.loc["P1"].tolist() == [2, 0, 0] and t.loc["P3"].tolist() == [0, 2, 0]
    assert np.isnan(t.loc["P2", "TP53"]) and t.loc["P2", "KRAS"] == 1


def test_regions_from_bed(multi, tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t50\t150\tfirst\nchr1\t150\t6000\nchr2\t0\t1000\tmulti\n")
    t = vcf_matrix(vcf_files(multi), regions=[("chr1", 50, 150, "first"), ("chr1", 150, 6000, "chr1:150-6000"),
                                                ("chr2", 0, 1000, "multi")])
    assert t.loc["P1"].tolist() == [1, 1, 2] and t.loc["P3"].tolist() == [0, 2, 0]
    assert np.isnan(t.loc["P2", "chr1:150-6000"]) and t.loc["P2", "multi"] == 1
    ingest_vcf(multi, "variants", tmp_path / "s.zarr", regions=bed)
    stored = open_store(tmp_path / "s.zarr", "r").read_table("variants")
    pd.testing.assert_frame_equal(stored.loc[:, list(t.columns)].astype(float), t, check_names=False,
                                  check_index_type=False)


def test_per_patient_vcfs_glob_absent_variant_is_zero(tmp_path):
    (tmp_path / "calls").mkdir()
    write_vcf(tmp_path / "calls" / "P1.vcf", ["P1"], [r[:5] + ([r[5][0]],) for r in ROWS[:1]])
    write_vcf(tmp_path / "calls" / "P2.vcf", ["P2"], [ROWS[2][:5] + (["./."],)])
    t = vcf_matrix(vcf_files(str(tmp_path / "calls" / "*.vcf.gz")))
    assert t.loc["P1"].tolist() == [1, 0]
    assert t.loc["P2", "chr1:100:A:G"] == 0 and np.isnan(t.loc["P2", "chr1:5000:G:A"])


def _vcf_text(samples, rows):
    lines = [HEADER.format(samples="\t".join(samples))]
    for chrom, pos, ref, alt, info, gts in rows:
        lines.append("\t".join([chrom, str(pos), ".", ref, alt, ".", "PASS", info, "GT", *gts]) + "\n")
    return "".join(lines)


@pytest.mark.parametrize("kind", ["plain", "gzip", "bgzip"])
def test_unindexed_vcfs_are_read_sequentially(multi, tmp_path, kind):
    """Issue 29 item 11: a small VCF that is plain text, plain gzip or bgzipped without an index is read from start
    to end and gives the same table as the indexed file; only --regions needs the index, and says so."""
    text = _vcf_text(["P1", "P2", "P3"], ROWS)
    path = tmp_path / ("calls.vcf" if kind == "plain" else "calls.vcf.gz")
    if kind == "plain":
        path.write_text(text)
    elif kind == "gzip":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        (tmp_path / "calls.vcf").write_text(text)
        pysam.tabix_compress(str(tmp_path / "calls.vcf"), str(path), force=True)
    assert not list(tmp_path.glob("calls.vcf*.tbi")) and not list(tmp_path.glob("calls.vcf*.csi"))
    indexed = vcf_matrix([Path(multi)])
    pd.testing.assert_frame_equal(vcf_matrix([path]), indexed)
    pd.testing.assert_frame_equal(vcf_matrix([path], genes=["TP53", "KRAS"]),
                                  vcf_matrix([Path(multi)], genes=["TP53", "KRAS"]))
    bed = [("chr1", 0, 1000, "TP53_region")]
    with pytest.raises(InputError, match=r"calls\.vcf(\.gz)?: --regions needs an indexed VCF.*Fix: .*tabix"):
        vcf_matrix([path], regions=bed)


def test_unindexed_bad_and_duplicate_vcfs_are_input_errors_naming_the_file(multi, tmp_path):
    plain = tmp_path / "plain.vcf.gz"
    with gzip.open(plain, "wt") as f:
        f.write(HEADER.format(samples="P1"))
    with pytest.raises(InputError, match="plain.vcf.gz: --regions needs an indexed VCF"):
        vcf_matrix([plain], regions=[("chr1", 0, 10, "r")])
    bad = tmp_path / "bad.vcf.gz"
    bad.write_bytes(b"not a vcf at all")
    (tmp_path / "bad.vcf.gz.tbi").write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.vcf.gz"):
        vcf_matrix([bad])
    with pytest.raises(InputError, match="also in"):
        vcf_matrix([multi, multi])
    unsafe = write_vcf(tmp_path / "unsafe.vcf", ["P 1"], [ROWS[0][:5] + (["0/1"],)])
    with pytest.raises(InputError, match="not a usable patient id"):
        vcf_matrix(vcf_files(unsafe))


def test_cli_extract_vcf_writes_the_table_and_exits_2_on_regions_of_an_unindexed_file(multi, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [str(Path(sys.executable).with_name("mmcli")), "extract", "--modality", "tabular",
           "--store", str(tmp_path / "s.zarr"), "--name", "variants"]
    ok = subprocess.run([*cmd, "--vcf", multi, "--genes", "TP53,KRAS"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert list(open_store(tmp_path / "s.zarr", "r").read_table("variants").columns) == ["TP53", "KRAS"]
    os.remove(multi + ".tbi")
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t1000\tTP53\n")
    bad = subprocess.run([*cmd, "--vcf", multi, "--regions", str(bed)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "cohort.vcf.gz" in bad.stderr + bad.stdout
