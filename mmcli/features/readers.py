"""Whole-slide image readers behind one interface, in the :data:`READERS` registry: cuCIM (fast, optional GPU
decode; an optional extra), OpenSlide (every vendor format) and tiffslide (pure Python fallback).

Every reader returns RGB ``uint8`` arrays ``(h, w, 3)`` and takes level-0 pixel coordinates, as OpenSlide does.
The default, ``open_slide(path, "auto")``, tries the readers in their ``auto`` order: cuCIM first when it is
importable, then OpenSlide, then tiffslide, each one in turn when the one before cannot open the file. Microns
per pixel come from the vendor metadata, else from the TIFF resolution tags (read with tifffile, so every reader
reports the same value for the same file).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmcli.features.tiling import choose_level
from mmcli.pipeline.errors import SlideError
from mmcli.pipeline.registry import Registry

log = logging.getLogger(__name__)
_DRAIN_TIMEOUT_S = 30.0
_MPP_RANGE = (0.01, 100.0)  # µm/px; outside it a resolution tag is a placeholder (e.g. 72 dpi), not a scan


class SlideReader(ABC):
    """One open slide. Coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)`` at ``level``."""

    name: ClassVar[str] = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- geometry and metadata ------------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]:
        """Vendor metadata as flat strings."""

    @property
    def vendor(self) -> str | None:
        return None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel (x), or None when the file does not say."""
        return tiff_mpp(self.path)

    @property
    def objective_power(self) -> float | None:
        return None

    # ---- pixels -----------------------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB ``(height, width, 3)`` uint8 at ``level`` whose top-left is level-0 pixel ``(x, y)``."""

    def read_regions(self, coords: np.ndarray, level: int, width: int, height: int) -> Iterator[np.ndarray]:
        """Tiles of one size at ``coords`` (level 0, shape (N, 2)), in order. Readers with a batched API
        (cuCIM) override this."""
        for x, y in coords:
            yield self.read_region(int(x), int(y), level, width, height)

    def thumbnail(self, downsample: float, strip_pixels: int = 1 << 24) -> tuple[np.ndarray, tuple[float, float]]:
        """RGB thumbnail about ``downsample`` times smaller than level 0 and its exact scale
        ``(sx, sy)`` in level-0 pixels per thumbnail pixel.

        Read in horizontal strips from the best level, so memory stays bounded even on a slide whose
        smallest level is large (OpenSlide's own thumbnail reads a whole level at once).
        """
        level = choose_level(self.level_downsamples, downsample)
        lw, lh = self.level_dimensions[level]
        w0, h0 = self.dimensions
        tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        ds = self.level_downsamples[level]
        out = np.empty((th, tw, 3), np.uint8)
        rows_per_strip = max(1, int(max(1, strip_pixels // lw) * th / lh))
        for ty in range(0, th, rows_per_strip):
            ty1 = min(th, ty + rows_per_strip)
            ly0, ly1 = math.floor(ty * lh / th), min(lh, math.ceil(ty1 * lh / th))
            strip = self.read_region(0, round(ly0 * ds), level, lw, max(1, ly1 - ly0))
            # map the strip onto exactly the thumbnail rows it covers
            box = (0.0, ty * lh / th - ly0, float(lw), ty1 * lh / th - ly0)
            img = Image.fromarray(strip).resize((tw, ty1 - ty), Image.BILINEAR, box=box, reducing_gap=2.0)
            out[ty:ty1] = np.asarray(img)
        return out, (w0 / tw, h0 / th)

    # ---- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """JSON-able summary stored with every item."""
        return {
            "reader": self.name,
            "vendor": self.vendor,
            "level0_size": list(self.dimensions),
            "level_count": self.level_count,
            "level_downsamples": [round(float(d), 4) for d in self.level_downsamples],
            "objective_power": self.objective_power,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _plausible_mpp(v: float | None) -> float | None:
    return v if v is not None and _MPP_RANGE[0] < v < _MPP_RANGE[1] else None


# ---- quiet failures: a damaged TIFF is one SlideError, not console noise -------------------------------------
class _LibraryToDebug(logging.Handler):
    """tifffile's complaints about a damaged file (``<tifffile.TiffPages @8> invalid page offset``...) become
    DEBUG records of this module: kept in the command's log file, never on the console (also not in a dask
    worker, whose root logger prints to stderr). The SlideError that follows tells the user."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("%s: %s", record.name, record.getMessage())


def quiet_tifffile() -> None:
    """Route tifffile's logger through :class:`_LibraryToDebug` (idempotent)."""
    lg = logging.getLogger("tifffile")
    if not any(isinstance(h, _LibraryToDebug) for h in lg.handlers):
        lg.addHandler(_LibraryToDebug())
        lg.propagate = False


async def _settle_pending() -> None:
    """Wait for the tasks still running on zarr's IO loop and retrieve their results (see :func:`drain_zarr`)."""
    import asyncio

    me = asyncio.current_task()
    for _ in range(3):  # tasks may start children; a few rounds are enough for one failed read
        tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT_S)
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: no "exception was never retrieved" report at exit


def drain_zarr() -> None:
    """After a failed tiffslide read: zarr decodes a region's chunks as concurrent tasks on its own event loop
    and stops waiting at the first error (e.g. a ``Jpeg8Error``), leaving the others pending. Left alone
    they are destroyed at exit with "Task was destroyed but it is pending" / "Event loop is closed" reports
    on the console; here they are waited for (bounded) and their errors retrieved."""
    try:
        from zarr.core import sync as zsync
    except ImportError:
        return
    loop = zsync.loop[0]
    if loop is None or loop.is_closed():
        return
    try:
        zsync.sync(_settle_pending(), loop=loop, timeout=_DRAIN_TIMEOUT_S * 4)
    except Exception as e:  # noqa: BLE001 - best effort; the read error is what matters
        log.debug("could not settle zarr's pending reads: %s", e)


def tiff_mpp(path: str | Path) -> float | None:
    """Level-0 µm/px from an Aperio ``MPP`` description or the TIFF resolution tags, or None.

    Resolution tags in centimetres or inches are converted; a tag without unit, or a value outside
    0.01-100 µm/px (such as the 72 dpi placeholder many writers put there), is treated as unknown.
    """
    import tifffile

    quiet_tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            desc = page.description or ""
            if desc.startswith("Aperio"):
                for part in desc.split("|"):
                    key, _, value = part.partition("=")
                    if key.strip() == "MPP":
                        return _plausible_mpp(_float(value.strip()))
            tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
            if tag is None or unit is None:
                return None
            num, den = tag.value
            per_unit = num / den if den else 0.0
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if not per_unit or um_per_unit is None:
                return None
            return _plausible_mpp(um_per_unit / per_unit)
    except Exception:  # noqa: BLE001 - not a TIFF, or unreadable: metadata simply unknown here
        return None


# ---- the registry --------------------------------------------------------------------------------------
# meta: auto_rank (the order ``auto`` tries readers in), requires (the package a reader needs: ``auto`` skips
# readers that are not installed), options (whether it takes open_slide's keyword options)
READERS: Registry[type[SlideReader]] = Registry("reader", flag="--reader")


# ---- OpenSlide -----------------------------------------------------------------------------------------
@READERS.register("openslide", auto_rank=1, options=False, requires="openslide")
class OpenSlideReader(SlideReader):
    """OpenSlide: Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, generic tiled TIFF and more."""

    name = "openslide"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(f"OpenSlide does not support the format of {path}") from e
        except openslide.OpenSlideError as e:
            raise SlideError(f"OpenSlide cannot read {path}: {e}") from e

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._slide.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._slide.properties)

    @property
    def vendor(self) -> str | None:
        return self._slide.properties.get("openslide.vendor")

    @property
    def mpp(self) -> float | None:
        return _plausible_mpp(_float(self._slide.properties.get("openslide.mpp-x"))) or super().mpp

    @property
    def objective_power(self) -> float | None:
        return _float(self._slide.properties.get("openslide.objective-power"))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self._slide.read_region((x, y), level, (width, height)))
        except openslide.OpenSlideError as e:
            raise SlideError(f"OpenSlide failed to read {self.path} at ({x}, {y}) level {level}: {e}") from e
        return np.ascontiguousarray(rgba[..., :3])

    def close(self) -> None:
        self._slide.close()


# ---- tiffslide -----------------------------------------------------------------------------------------
@READERS.register("tiffslide", auto_rank=2, options=False, requires="tiffslide")
class TiffSlideReader(SlideReader):
    """tiffslide: tifffile + zarr, pure Python; reads SVS, generic and OME pyramidal TIFF."""

    name = "tiffslide"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        import tiffslide

        quiet_tifffile()
        slide = None
        try:
            slide = tiffslide.TiffSlide(str(path))
            _ = slide.properties, slide.level_dimensions  # parsed lazily: fail here, not later
        except Exception as e:  # noqa: BLE001 - tiffslide raises many types for unreadable files
            if slide is not None:
                _close_quietly(slide)
            raise SlideError(f"tiffslide cannot read {path}: {type(e).__name__}: {e}") from e
        self._slide = slide

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._slide.properties.items() if v is not None}

    @property
    def vendor(self) -> str | None:
        return self._slide.properties.get("tiffslide.vendor")

    @property
    def mpp(self) -> float | None:
        return _plausible_mpp(_float(self._slide.properties.get("tiffslide.mpp-x"))) or super().mpp

    @property
    def objective_power(self) -> float | None:
        return _float(self._slide.properties.get("tiffslide.objective-power"))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            arr = self._slide.read_region((x, y), level, (width, height), as_array=True)
        except Exception as e:  # noqa: BLE001
            drain_zarr()
            raise SlideError(f"tiffslide failed to read {self.path} at ({x}, {y}) level {level}: {e}") from e
        return np.ascontiguousarray(np.asarray(arr)[..., :3])

    def close(self) -> None:
        _close_quietly(self._slide)


def _close_quietly(slide: Any) -> None:
    try:
        slide.close()
    except Exception as e:  # noqa: BLE001 - closing a damaged file must not mask the error being reported
        log.debug("closing %r: %s", slide, e)


# ---- cuCIM -----------------------------------------------------------------------------------------------
@READERS.register("cucim", auto_rank=0, options=True, requires="cucim")
class CuCIMReader(SlideReader):
    """cuCIM (RAPIDS): multi-threaded TIFF/SVS decoding on CPU, nvJPEG decoding on GPU with ``device="cuda"``.

    ``read_regions`` uses cuCIM's batched reader (``num_workers`` threads). With ``device="cuda"`` tiles come
    back as CUDA arrays; :meth:`read_regions` then yields ``torch`` tensors on the GPU (zero copy via DLPack).
    """

    name = "cucim"

    def __init__(self, path: str | Path, device: str = "cpu", num_workers: int = 4) -> None:
        super().__init__(path)
        try:
            from cucim import CuImage
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise SlideError("cuCIM is not installed (pip install 'mmcli[cucim]')") from e
        try:
            self._img = CuImage(str(path))
        except Exception as e:  # noqa: BLE001
            raise SlideError(f"cuCIM cannot read {path}: {type(e).__name__}: {e}") from e
        self.device = device
        self.num_workers = num_workers
        res = self._img.resolutions
        self._dims = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self._ds = tuple(float(d) for d in res["level_downsamples"])
        meta = self._img.metadata
        self._meta: dict[str, Any] = json.loads(meta) if isinstance(meta, str) else dict(meta or {})

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._ds

    @property
    def properties(self) -> dict[str, str]:
        flat: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = str(obj)

        walk("", self._meta)
        return flat

    @property
    def vendor(self) -> str | None:
        return "aperio" if "aperio" in self._meta else None

    @property
    def mpp(self) -> float | None:
        aperio = self._meta.get("aperio", {})
        return _plausible_mpp(_float(aperio.get("MPP"))) or super().mpp

    @property
    def objective_power(self) -> float | None:
        return _float(self._meta.get("aperio", {}).get("AppMag"))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._img.read_region(location=(x, y), size=(width, height), level=level)
        except Exception as e:  # noqa: BLE001
            raise SlideError(f"cuCIM failed to read {self.path} at ({x}, {y}) level {level}: {e}") from e
        return np.ascontiguousarray(np.asarray(region)[..., :3])

    def read_regions(self, coords: np.ndarray, level: int, width: int, height: int) -> Iterator[Any]:
        if len(coords) == 0:
            return
        locations = [(int(x), int(y)) for x, y in coords]
        # cuCIM's batched reader: decodes the tiles with its own threads (nvJPEG on the GPU with device="cuda")
        try:
            batches = list(self._img.read_region(locations, (width, height), level=level,
                                                 num_workers=self.num_workers, batch_size=len(locations),
                                                 device=self.device))
        except Exception as e:  # noqa: BLE001
            if self.device != "cuda":
                raise SlideError(f"cuCIM failed to read {self.path} at level {level}: {e}") from e
            log.warning("cuCIM GPU decoding failed for %s (%s); decoding on the CPU instead", self.path, e)
            self.device = "cpu"
            yield from self.read_regions(coords, level, width, height)
            return
        for batch in batches:
            if self.device == "cuda":
                import cupy
                import torch

                arr = torch.from_dlpack(cupy.asarray(batch))
            else:
                arr = np.asarray(batch)
            arr = arr[None] if arr.ndim == 3 else arr
            yield from (a[..., :3] for a in arr)

    def close(self) -> None:
        close = getattr(self._img, "close", None)
        if close is not None:
            close()


# ---- choosing a reader ---------------------------------------------------------------------------------
def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cucim_available() -> bool:
    return installed("cucim")


# every reader, in the order ``auto`` tries them; ``--reader`` takes these or ``auto``
READER_NAMES: tuple[str, ...] = tuple(sorted(READERS.names(), key=lambda n: READERS.entry(n).meta["auto_rank"]))
READER_CHOICES: tuple[str, ...] = ("auto", *READER_NAMES)


def reader_order(reader: str = "auto") -> list[str]:
    """Readers to try, in order: ``auto`` = cuCIM (when installed), then OpenSlide, then tiffslide (each when
    installed); a named reader is tried alone."""
    if reader == "auto":
        return [n for n in READER_NAMES if installed(READERS.entry(n).meta["requires"])]
    if reader not in READER_NAMES:
        raise ValueError(f"unknown reader {reader!r}; choose one of {list(READER_CHOICES)}")
    return [reader]


def open_slide(path: str | Path, reader: str = "auto", **kwargs: Any) -> SlideReader:
    """Open a slide with ``reader`` (``auto``, the default: the first of :func:`reader_order` that can read it).

    Raises ``FileNotFoundError`` for a missing file and :class:`SlideError`, naming every reader's
    complaint, for an unsupported or corrupt one.
    """
    path = Path(path)
    try:
        is_file = stat.S_ISREG(path.stat().st_mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SlideError(f"cannot open slide {path}: symlink loop (the link leads back to itself). Fix: point "
                             "it at the slide file.") from e
        is_file = False
    if not is_file:
        raise FileNotFoundError(2, "slide not found", str(path))
    errors: list[str] = []
    for name in reader_order(reader):
        entry = READERS.entry(name)
        try:
            return entry.obj(path, **kwargs) if entry.meta["options"] else entry.obj(path)  # only cuCIM takes any
        except SlideError as e:
            errors.append(str(e))
    raise SlideError(f"cannot open slide {path} (unsupported or corrupt): " + "; ".join(errors))


def slide_opener(path: str | Path, reader: str, **kwargs: Any) -> Callable[[], SlideReader]:
    """A zero-argument factory opening ``path`` with one named reader (tile threads each open their own
    handle with it, which is thread-safe for every backend)."""

    def _open() -> SlideReader:
        return open_slide(path, reader, **kwargs)

    return _open
