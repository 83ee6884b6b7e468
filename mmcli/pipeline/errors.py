"""Every mmcli exception, one tree rooted at :class:`MmcliError`.

``exit_code`` is what the CLI exits with (0 ok, 1 per-item failures or a full disk, 2 bad usage or input);
the CLI prints ``error: <str(e)>`` and maps the code in one place (``mmcli.cli``). An error may carry
structured fields besides its message: ``path`` (the file or folder concerned), ``flag`` (the CLI option,
as the field name ``patch_size`` or the spelling ``--patch-size``) and ``fix`` (what to do about it). A
message given alone prints unchanged; given fields are added only where the message does not already say
them::

    InputError("must be >= 2, got 1", flag="folds", fix="lower --folds")
    # str(): "--folds: must be >= 2, got 1. Fix: lower --folds"

Tree (classes defined outside this module name their module; ``tests/pipeline/test_errors.py`` checks that
every subclass of :class:`MmcliError` in mmcli is named here)::

    MmcliError (2)
    ├── InputError (2)                bad user input: file, row, value, flag
    │   ├── FormatError               a file that does not follow the layout it is read as (CLAM/TRIDENT/STAMP h5)
    │   ├── ModalityNotAvailable      no extractor for a modality (also a NotImplementedError)
    │   ├── SynthInputError           bad arguments to ``synth`` (also a ValueError)
    │   ├── RunFolderError            a run folder that is missing, malformed or of a newer schema
    │   ├── StudyError                a study file that does not read or validate; names each key's path
    │   │                             (workflows/study_file.py)
    │   ├── AnnotationError           a GeoJSON / CSV annotation that cannot be used (features/qc/annotations.py)
    │   ├── SegmentationError         a segmentation checkpoint that cannot be loaded (features/qc/segmentation.py)
    │   ├── StainError                a stain reference image that cannot serve (features/qc/stain.py)
    │   ├── NotFound                  serve: a patient the server does not have, HTTP 404 (stages/serve/service.py)
    │   └── Unprocessable             serve: a request that cannot be scored, HTTP 422 (stages/serve/service.py)
    ├── StoreError (2)                the feature store is missing, unreadable or inconsistent
    │   └── UnsafeEntry               an entry mmcli never writes (a link, a hidden key): refused, never followed
    │                                 (pipeline/store/keys.py)
    ├── DiskFullError (1)             ENOSPC / EDQUOT while writing; names the path
    ├── ItemError (1)                 one item of a cohort run failed (corrupt file, wrong rank, empty note...)
    │   └── SlideError                a slide that cannot be opened or read
    ├── LockHeld (2)                  a lock file held by another live process; the caller words it
    │                                 (pipeline/locks.py)
    ├── AuditChainError (1)           the serve audit log was edited, forged, reordered or cut (stages/serve/audit.py)
    ├── AuditUnavailable (1)          serve: the audit log cannot take a line now (HTTP 503; stages/serve/audit.py)
    ├── StoreUnavailable (2)          serve: the store cannot give a patient's features (HTTP 503;
    │                                 stages/serve/service.py)
    └── _Stopped (2)                  serve: uvicorn stopped on a signal; control flow, never shown
                                      (stages/serve/server.py)
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ITEM_FAILURES = 1
EXIT_INPUT = 2


def flag_spelling(flag: str) -> str:
    """``patch_size`` -> ``--patch-size`` (:func:`mmcli.pipeline.options.flag_of`); a spelled flag is kept."""
    if flag.startswith("-"):
        return flag
    from mmcli.pipeline.options import flag_of  # late: options imports this module (and pydantic)

    return flag_of(flag)


class MmcliError(Exception):
    """Base error; ``exit_code`` is what the CLI exits with. See the module doc for the fields."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str = "", *, path: str | Path | None = None, fix: str | None = None,
                 flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.fix = fix
        self.flag = flag_spelling(flag) if flag else None

    def __str__(self) -> str:
        text = self.message
        where = self.flag if self.flag is not None else (str(self.path) if self.path is not None else None)
        if where and where not in text:
            text = f"{where}: {text}" if text else where
        if self.fix and self.fix not in text:
            text = f"{text.rstrip('.')}. Fix: {self.fix}" if text else f"Fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready fields (``--json`` outputs, run records)."""
        return {"error": type(self).__name__, "message": str(self), "exit_code": self.exit_code,
                "path": None if self.path is None else str(self.path), "flag": self.flag, "fix": self.fix}


class InputError(MmcliError):
    """Bad user input (file, row, value). The message names the file, the row and the fix."""

    exit_code = EXIT_INPUT


class StoreError(MmcliError):
    """The feature store is missing, unreadable or inconsistent."""

    exit_code = EXIT_INPUT


class DiskFullError(MmcliError):
    """No space left on the device being written (errno ENOSPC); the message names the path."""

    exit_code = EXIT_ITEM_FAILURES


class FormatError(InputError):
    """A file that does not follow the layout it is read as (message names the file)."""


class ModalityNotAvailable(InputError, NotImplementedError):
    """No extractor is registered for the requested modality."""


class SynthInputError(InputError, ValueError):
    """Bad arguments to :func:`mmcli.stages.synth.synth` (a ``ValueError`` too, for Python callers)."""


class RunFolderError(InputError):
    """A run folder that is not one, has a malformed file, or was written by a newer mmcli."""


class ItemError(MmcliError):
    """An expected, explainable failure of one item (corrupt file, wrong rank, empty note...).

    The cohort runner records it against the item and goes on; the run then exits 1.
    """

    exit_code = EXIT_ITEM_FAILURES


class SlideError(ItemError):
    """A slide that cannot be opened or read (unsupported format, corrupt file)."""


ALL_ERRORS: tuple[type[MmcliError], ...] = (
    MmcliError, InputError, StoreError, DiskFullError, FormatError, ModalityNotAvailable, SynthInputError,
    RunFolderError, ItemError, SlideError,
)


class ItemInterrupted(BaseException):
    """Not an error but a stop request: raised inside an item when the run was asked to stop (SIGINT/SIGTERM),
    so the item is abandoned unwritten. A ``BaseException`` (like ``KeyboardInterrupt``) so that an extractor's
    ``except Exception`` cannot swallow it; the only exception class of mmcli outside the MmcliError tree."""


class Interrupted(BaseException):  # noqa: N818 - named for what happened, like KeyboardInterrupt
    """Not an error but a stop request: a signal stopped the command (``fit``); ``exit_code`` is 128 + the
    signal number. A ``BaseException`` so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, note: str = "") -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.note = note
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        return f"interrupted by {self.name}" + (f": {self.note}" if self.note else "")

    def __str__(self) -> str:
        return self.message
