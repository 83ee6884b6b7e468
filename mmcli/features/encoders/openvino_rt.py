"""OpenVINO on the CPU for the frozen encoders: convert a torch module once, keep the IR on disk, compile it
with the CPU plugin, run it; NNCF post-training int8 quantisation of such an IR and its fidelity check.

The converted model (``model.xml`` + ``model.bin``, fp32 weights) lives outside the feature store, in
``$MMCLI_CACHE/openvino/<key>-<openvino version>-<precision>/`` (default ``~/.cache/mmcli``), so later runs
and every dask worker load it in seconds instead of tracing the network again. A folder appears whole or not
at all (written under a temporary name, then renamed). Compiled CPU blobs are cached by OpenVINO itself
(``CACHE_DIR``) next to it.

Importing this module does not import openvino or torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Measured on the 2-core build machine (resnet50_trunc, batch 64, 2 threads): one LATENCY stream with every
# thread is as fast as THROUGHPUT's two streams for a synchronous caller and needs one request, not two.
PERFORMANCE_HINT = "LATENCY"


def cache_root() -> Path:
    """``$MMCLI_CACHE/openvino`` (default ``~/.cache/mmcli/openvino``)."""
    base = os.environ.get("MMCLI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmcli")
    return Path(base) / "openvino"


def version() -> str:
    import openvino

    return str(openvino.__version__)


def short_version() -> str:
    """``2026.4.1`` of ``2026.4.1-22982-...`` (folder names)."""
    return version().split("-")[0]


def cpu_capabilities() -> set[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (``BF16`` where the CPU computes it natively)."""
    import openvino as ov

    return {str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def effective_precision(precision: str) -> str:
    """The float precision OpenVINO will compute in: ``auto``/``bf16`` -> bf16 where the CPU has it, else fp32
    (OpenVINO has no fp16 path on x86 CPUs: fp16 also runs as bf16 or fp32)."""
    if precision in ("auto", "bf16", "fp16"):
        return "bf16" if "BF16" in cpu_capabilities() else "fp32"
    return precision


def model_dir(key: str, precision: str) -> Path:
    """Cache folder of one converted model: ``<root>/<key>-<ov version>-<precision>``."""
    return cache_root() / f"{key}-{short_version()}-{precision}"


def _publish(tmp: Path, dest: Path) -> Path:
    """Rename a finished temporary folder to ``dest``; a concurrent writer that got there first wins."""
    try:
        os.replace(tmp, dest)
    except OSError:  # dest exists and is not empty: another process published the same model
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "model.xml"


def save_atomic(model: Any, dest: Path, meta: dict[str, Any] | None = None) -> Path:
    """Save an ``ov.Model`` as ``dest/model.xml`` (+ ``meta.json``), all or nothing."""
    import openvino as ov

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dest)


def ov_type(name: str) -> Any:
    """OpenVINO element type of ``name``: its own short names (``u8``, ``f32``, ``i64``) or a numpy dtype name.
    (``ov.Type("u8")`` alone would read numpy's ``u8``, i.e. uint64.)"""
    import openvino as ov

    short = getattr(ov.Type, name, None)
    return short if isinstance(short, ov.Type) else ov.Type(name)


def convert_cached(dest: Path, build: Callable[[], Any], example: Any, shapes: Sequence[tuple[Sequence[int], str]],
                   meta: dict[str, Any] | None = None) -> tuple[Path, bool]:
    """``(model.xml, converted_now)``: the IR in ``dest``, converted from ``build()`` (a torch module) with
    ``example`` input(s) and input ``shapes`` ``[(shape with -1 for dynamic, element type)]`` when absent."""
    xml = dest / "model.xml"
    if xml.is_file() and (dest / "model.bin").is_file():
        return xml, False
    import openvino as ov
    import torch

    module = build()
    inputs = [(ov.PartialShape(list(s)), ov_type(t)) for s, t in shapes]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # convert_model traces with torch.jit (deprecated)
        model = ov.convert_model(module, example_input=example, input=inputs)
    return save_atomic(model, dest, {**(meta or {}), "openvino": version()}), True


def read_model(xml: str | Path, static: Sequence[Sequence[int]] | None = None) -> Any:
    """The ``ov.Model`` of ``xml``; with ``static`` (one shape per input) its dynamic dimensions are fixed
    first, so the CPU plugin compiles kernels for that one shape (a converted IR stays dynamic on disk)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    if static is not None:
        model.reshape({model.inputs[i]: ov.PartialShape([int(d) for d in s]) for i, s in enumerate(static)})
    return model


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CompiledModel:
    """A compiled OpenVINO CPU model with one infer request, safe to call from several threads (serialised:
    one request already uses every inference thread)."""

    def __init__(self, xml: Any, precision: str = "fp32", threads: int | None = None,
                 hint: str = PERFORMANCE_HINT) -> None:
        import openvino as ov

        core = ov.Core()
        blobs = cache_root() / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        self.precision = precision
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "CACHE_DIR": str(blobs)}
        if precision != "int8":  # int8 IRs keep their quantised ops; the hint sets the float parts' precision
            config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == "bf16" else "f32"
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        config["INFERENCE_NUM_THREADS"] = self.threads
        if hint == "LATENCY":
            config["NUM_STREAMS"] = 1
        self.config = {k: v for k, v in config.items() if k != "CACHE_DIR"}
        model = core.read_model(str(xml)) if isinstance(xml, (str, Path)) else xml  # a path or an ov.Model
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        """First output as a float32 array owned by the caller."""
        with self._lock:
            res = self._request.infer(list(inputs), share_inputs=True)
            return np.array(res[0], dtype=np.float32, copy=True)


# ---- int8 ------------------------------------------------------------------------------------------------
def quantize_int8(xml: str | Path, calibration: Sequence[np.ndarray]) -> Any:
    """NNCF post-training quantisation of the float IR ``xml`` on ``calibration`` batches (each one model
    input): the int8 ``ov.Model`` (save it with :func:`save_atomic`). CPU target, performance preset."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration),
                         preset=nncf.QuantizationPreset.PERFORMANCE, target_device=nncf.TargetDevice.CPU)


def nncf_version() -> str:
    import nncf

    return str(nncf.__version__)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(den > 0, den, 1.0)


def fidelity(float_model: Callable[[np.ndarray], np.ndarray], int8_model: Callable[[np.ndarray], np.ndarray],
             batches: Sequence[np.ndarray]) -> dict[str, Any]:
    """Cosine of int8 to float features on held-out ``batches``: ``{"n", "min", "median", "mean"}``."""
    cos = np.concatenate([cosine_rows(int8_model(b), float_model(b)) for b in batches]) if batches else np.zeros(0)
    if cos.size == 0:
        return {"n": 0, "min": None, "median": None, "mean": None}
    return {"n": int(cos.size), "min": round(float(cos.min()), 6), "median": round(float(np.median(cos)), 6),
            "mean": round(float(cos.mean()), 6)}
