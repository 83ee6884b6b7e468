"""What every frozen encoder needs to run, in one place: device and precision rules, autocast, checkpoint
loading, the offline Hugging Face cache and the one loud warning for a randomly initialised encoder.

Image (:mod:`~mmcli.features.encoders.image`), volume (:mod:`~mmcli.features.encoders.volume`) and text
(:mod:`~mmcli.features.encoders.text`) encoders all use these and none of them imports another. Importing this
module does not import torch.

Two device helpers with two meanings:

- :func:`resolve_device` answers *which device* (a string, ``"auto"`` resolved); a wrong value is a
  ``ValueError`` for the caller to phrase;
- :func:`resolve_runtime` answers *device and precision for torch* (a ``torch.device`` and a precision name);
  a wrong value is an :class:`~mmcli.pipeline.errors.InputError` (exit 2).
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what torch runs
INT8 = "int8"  # OpenVINO only, after NNCF post-training quantisation (its own encoder_id)
RUNTIMES = ("auto", "torch", "torch-compile", "openvino")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # what --device takes
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WARNED: set[tuple[str, int | None]] = set()
_WARN_LOCK = threading.Lock()


# ---- device and precision ----------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is a ``ValueError``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device. Fix: use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX, or ARM BF16)."""
    import torch

    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith(("flags", "Features")):
                        flags = set(line.split(":", 1)[1].split())
                        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        except OSError:
            pass
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: str, preferred: str | None = None) -> str:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32. A wrong value is a ``ValueError``.

    ``preferred`` is what ``auto`` means for a model whose authors run it in one precision (TRIDENT's per-encoder
    dtype, e.g. bf16 for UNI2-h, fp32 for Phikon-v2): on CUDA that precision (fp32 where the GPU lacks a
    preferred bf16); on a CPU fp32 when the model runs in fp32, else the CPU rule above.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "auto":
        if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16; use --precision fp16 or auto")
        return precision
    if device.startswith("cuda"):
        if preferred == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp32"
        return preferred or "fp16"
    if preferred == "fp32":
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def resolve_runtime(device: str, precision: str) -> tuple[Any, str]:
    """``(torch.device, precision)`` by the rules above; a wrong value is an :class:`InputError`."""
    import torch

    try:
        dev = resolve_device(device)
        return torch.device(dev), resolve_precision(precision, dev)
    except ValueError as e:
        raise InputError(str(e)) from e


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it cannot be imported (checked on every call)."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def resolve_backend(runtime: str, device: str) -> str:
    """Which inference runtime runs an encoder: ``torch``, ``torch-compile`` or ``openvino``.

    ``auto``: torch on CUDA (fp16; TensorRT would be the next step there, untested so not offered), OpenVINO on
    CPU when it is importable, else torch. A runtime that cannot run here is a ``ValueError``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {' | '.join(RUNTIMES)}")
    cuda = device.startswith("cuda")
    if runtime == "auto":
        return "torch" if cuda or openvino_version() is None else "openvino"
    if runtime == "openvino":
        if cuda:
            raise ValueError("--runtime openvino runs on the CPU; on CUDA use --runtime torch (or auto)")
        if openvino_version() is None:
            raise ValueError("--runtime openvino: the openvino package is not installed. Fix: pip install "
                             "openvino nncf, or use --runtime torch")
    return runtime


def check_backend(runtime: str, device: str) -> str:
    """:func:`resolve_backend` for ``--runtime`` / ``--device`` as given on the command line; a runtime that cannot
    run here is an :class:`InputError` (exit 2) naming the flag, before any item runs."""
    try:
        return resolve_backend(runtime, resolve_device(device))
    except ValueError as e:
        raise InputError(f"--runtime {runtime}: {e}") from e


def resolve_execution(device: str, precision: str, runtime: str) -> tuple[Any, str, str]:
    """``(torch.device, precision, backend)`` of an encoder built from ``--device``, ``--precision`` and
    ``--runtime``: on OpenVINO the precision is the one OpenVINO runs (:func:`openvino_rt.effective_precision`).
    A value that cannot run here is an :class:`InputError` naming the flag."""
    dev, prec = resolve_runtime(device, precision)
    try:
        backend = resolve_backend(runtime, dev.type)
    except ValueError as e:
        raise InputError(f"--runtime {runtime}: {e}") from e
    if backend == "openvino":
        from mmcli.features.encoders import openvino_rt

        prec = openvino_rt.effective_precision(precision)
    return dev, prec, backend


def runtime_version(backend: str) -> str:
    """Version of the package that runs ``backend``."""
    if backend == "openvino":
        return openvino_version() or "?"
    import torch

    return str(torch.__version__)


def amp_dtype(precision: str) -> Any:
    """The autocast dtype of ``precision`` (None for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: Any, precision: str) -> Any:
    """Autocast context for ``precision`` on ``device`` (a ``torch.device`` or ``"cuda:0"``); off for fp32."""
    import torch

    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    dtype = amp_dtype(precision)
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---- checkpoints ---------------------------------------------------------------------------------------
def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a checkpoint: ``.safetensors``, or any torch file read with ``weights_only=True``
    (no pickled code is ever run). ``state_dict``/``model`` wrappers and ``module.`` prefixes are removed."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot load weights {path} with torch.load(weights_only=True): {e}. "
                             "Fix: save a plain state_dict (or use safetensors).") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---- the Hugging Face cache (offline by default) -------------------------------------------------------
def hf_cache_dir() -> str:
    """The hub cache as the environment says now (``HF_HUB_CACHE``, else ``HF_HOME/hub``); huggingface_hub
    itself reads these only when it is imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def hf_downloads_allowed() -> bool:
    """Downloads only when ``HF_HUB_OFFLINE`` is explicitly off: mmcli is offline by default."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def hf_cached_ids(repo: str, repo_type: str = "model") -> list[str]:
    """The spellings of ``repo`` in the local cache: ``repo`` itself, then every cached folder whose id differs
    only in case (the Hub matches ids case-insensitively, the cache folder keeps the spelling the download used:
    ``MahmoodLab/uni`` as TRIDENT, STAMP and the UNI README write it is ``models--MahmoodLab--uni``)."""
    exact = f"{repo_type}s--{repo.replace('/', '--')}"
    ids = [repo]
    try:
        folders = sorted(Path(hf_cache_dir()).iterdir())
    except OSError:
        return ids
    for d in folders:
        if d.name != exact and d.name.lower() == exact.lower() and d.is_dir():
            ids.append(d.name.split("--", 1)[1].replace("--", "/", 1))
    return ids


def hf_cached_file(repo: str, filenames: tuple[str, ...], repo_type: str = "model") -> tuple[str, str] | None:
    """``(path, cached repo id)`` of the first of ``filenames`` (in that order) of ``repo`` in the local cache,
    the repo id matched case-insensitively; the ``main`` ref first, else the newest snapshot holding the file.
    Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    for rid in hf_cached_ids(repo, repo_type):
        for name in filenames:
            hit = try_to_load_from_cache(rid, name, cache_dir=cache, repo_type=repo_type)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, rid
        snaps = Path(cache) / f"{repo_type}s--{rid.replace('/', '--')}" / "snapshots"
        for name in filenames:  # no refs/main (a snapshot fetched by revision): the newest snapshot with it
            found = sorted((s / name for s in snaps.glob("*") if (s / name).is_file()),
                           key=lambda f: f.stat().st_mtime, reverse=True)
            if found:
                return str(found[0]), rid
    return None


def hf_file(repo: str, filenames: tuple[str, ...]) -> str | None:
    """Path of the first of ``filenames`` of ``repo`` in the local HF cache (:func:`hf_cached_file`; downloaded
    first only when :func:`hf_downloads_allowed`), else None."""
    hit = hf_cached_file(repo, filenames)
    if hit:
        return hit[0]
    if hf_downloads_allowed():
        from huggingface_hub import hf_hub_download

        for name in filenames:
            try:
                return hf_hub_download(repo, name, cache_dir=hf_cache_dir())
            except Exception as e:  # noqa: BLE001 - unreachable hub or missing file: try the next, then give up
                log.info("download of %s/%s failed: %s", repo, name, e)
    return None


def hf_snapshot(repo: str) -> Path:
    """Local folder of a whole model repo in the offline cache (never downloads); raises when absent."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo, local_files_only=True, cache_dir=hf_cache_dir()))


# ---- the one random-init warning -----------------------------------------------------------------------
def hub_weights_fix(repo: str, filename: str = HF_WEIGHT_FILES[0], what: str = "") -> str:
    """How to place ``repo``'s ``filename`` where mmcli looks offline (the fix of a random-init warning)."""
    cache = hf_cache_dir()
    name = what or f"the weights {repo}"
    return (f"place {name} in the offline Hugging Face cache ({cache}): on a machine with internet run "
            f"`hf download {repo} {filename}` and copy its folder models--{repo.replace('/', '--')} into {cache} "
            f"(or set HF_HUB_CACHE to a copied cache); or pass --weights FILE ({filename} or another state dict of "
            "this architecture)")


def r3d18_weights_fix() -> str:
    """Where torchvision's Kinetics-400 R3D-18 weights come from and how mmcli takes them."""
    try:
        from torchvision.models.video import R3D_18_Weights

        url = R3D_18_Weights.KINETICS400_V1.url
    except Exception:  # noqa: BLE001 - torchvision without video models: name the weights without the URL
        url = "torchvision's R3D_18_Weights.KINETICS400_V1"
    return (f"pass --weights FILE with torchvision's Kinetics-400 r3d_18 weights ({url}, fetched on a machine with "
            "internet; its 3-channel stem is folded to MRI's one channel), or a safetensors / torch state dict of "
            "r3d_18 pretrained on MRI")


def warn_random_init(encoder: str, seed: int | None, why: str, fix: str) -> None:
    """Say loudly, once per process and (encoder, seed), that features come from random weights.

    One message through one channel: a ``WARNING`` record of this module's logger when the application has
    configured logging (so it lands in the command's log), else a red ``WARNING`` line on stderr.
    """
    with _WARN_LOCK:
        if (encoder, seed) in _WARNED:
            return
        _WARNED.add((encoder, seed))
    init = f"a RANDOM initialisation (seed {seed})" if seed is not None else "RANDOM values for those weights"
    msg = (f"NO PRETRAINED WEIGHTS for encoder {encoder!r} ({why}): using {init}. Features are random "
           f"projections, not learned representations; items are marked pretrained=false. Fix: {fix}")
    if logging.getLogger().handlers or log.handlers:
        log.warning(msg)
    else:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]WARNING[/bold red] {escape(msg)}", highlight=False)


# ---- keeping the encoder fed ---------------------------------------------------------------------------
class Prefetcher:
    """Prepares the next items (read, decode, preprocess, tokenise) in one background thread while the encoder
    runs on this one; OpenVINO and torch release the GIL while they compute, so the two overlap.

    ``ahead(key, *args)`` queues ``prepare(*args)`` for an item that comes later; ``take(key, *args)`` returns
    that result, or computes it now when it was not queued. At most ``depth`` items are queued (the oldest hint
    is dropped first). An error of ``prepare`` is raised by ``take``, as if it had run there.
    """

    def __init__(self, prepare: Callable[..., Any], depth: int = 2) -> None:
        self.prepare = prepare
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[Hashable, Future[Any]] = {}  # in hint order
        self._lock = threading.Lock()
        self.hits = 0  # items whose preparation was queued ahead (tests and benchmarks read it)

    def ahead(self, key: Hashable, *args: Any) -> None:
        with self._lock:
            if key in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmcli-prefetch")
            self._pending[key] = self._pool.submit(self.prepare, *args)
            while len(self._pending) > self.depth:  # not started yet: never runs; running: its result is dropped
                self._pending.pop(next(iter(self._pending))).cancel()

    def take(self, key: Hashable, *args: Any) -> Any:
        with self._lock:
            fut = self._pending.pop(key, None)
        if fut is None or fut.cancelled():
            return self.prepare(*args)
        self.hits += 1
        return fut.result()
