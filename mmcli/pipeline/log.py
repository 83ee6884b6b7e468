"""One logger per command: ``logging.getLogger("mmcli")`` to the console (stderr) and to a log file beside the
command's output (the store's ``<store>.runs/``, the run folder, the report folder).

:func:`command_log` sets it up for the length of one command (the CLI does this in one place). Inside it:

* records of the ``mmcli`` logger (and its children, e.g. ``mmcli.features.readers``) go to stderr as plain
  ``message`` lines and to the log file with time, level and logger name;
* a record logged with ``extra=FILE_ONLY`` goes to the log file only (result lines already printed on stdout,
  per-item failures already shown by the progress display, tracebacks);
* every other library's log records (tiffslide, asyncio, distributed...) and Python warnings go to the log file
  only, not the console; so do "Exception ignored in ..." reports of objects finalised during the command.

The log file is opened only once its folder exists (earlier records wait in memory), so a command that stops
on bad input before creating its output leaves nothing behind. When the folder never appears and the command
hit an unexpected error, the log (with the traceback) is written to :func:`fallback_dir` instead.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import stat
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOGGER_NAME = "mmcli"
FILE_ONLY: dict[str, Any] = {"mmcli_console": False}
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str | None = None) -> logging.Logger:
    """``mmcli`` or ``mmcli.<name>``."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def fallback_dir() -> Path:
    """Where a log goes whose command never created its output folder (it may hold patient ids and paths): a
    folder only its user can open (mode 0700), ``$XDG_STATE_HOME/mmcli/logs`` (``~/.local/state/mmcli/logs``),
    else ``$TMPDIR/mmcli-logs-<uid>``, else a new ``$TMPDIR/mmcli-logs-XXXX``. A candidate that is a link, or
    belongs to another user, is skipped (a planted folder in a shared /tmp is never written into)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for folder in (Path(state) / "mmcli" / "logs", Path(tempfile.gettempdir()) / f"mmcli-logs-{uid}"):
        if _private_dir(folder):
            return folder
    return Path(tempfile.mkdtemp(prefix="mmcli-logs-"))


def _private_dir(folder: Path) -> bool:
    """Make ``folder`` (mode 0700) or check an existing one: a real folder of this user, closed to others."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            return False
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(folder, 0o700)
        return True
    except OSError:
        return False


def stamp() -> str:
    """Timestamp + pid for log and record file names: ``20250101T120000123456-4242``."""
    return f"{_dt.datetime.now().strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}"


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is at emit time (rich's live display or a test runner swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


class DeferredFileHandler(logging.Handler):
    """Writes to ``path`` once its folder exists; records before that wait in memory."""

    def __init__(self, path: Path | None) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.written_to: Path | None = None
        self._buffer: list[str] = []
        self._fh: TextIO | None = None
        self._closed = False
        self.setFormatter(logging.Formatter(FILE_FORMAT))

    def _open(self, path: Path, private: bool = False) -> None:
        if private:  # a new file only its user can read, never through a planted link
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            self._fh = open(fd, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the command's length
        else:
            self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the command's length
        self.written_to = path
        for line in self._buffer:
            self._fh.write(line + "\n")
        self._buffer.clear()
        self._fh.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self._fh is None and self.path is not None and self.path.parent.is_dir():
                self._open(self.path)
            if self._fh is None:
                self._buffer.append(line)
                return
            self._fh.write(line + "\n")
            self._fh.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command (full disk, removed folder)
            # a log that cannot be written (read-only or full disk) is given up quietly: logging's own
            # handleError would print a "--- Logging error ---" traceback on the console
            self.path, self._fh, self._buffer = None, None, []

    def close(self, *, fallback: Path | None = None) -> Path | None:
        """Flush and close; with ``fallback``, write there when the log's own folder never appeared. Closing
        again is a no-op (``logging.shutdown`` closes every handler still alive at exit: re-opening the file
        then would truncate the finished log)."""
        if self._closed:
            return self.written_to
        self._closed = True
        try:
            if self._fh is None:
                if self.path is not None and self.path.parent.is_dir():
                    self._open(self.path)
                elif fallback is not None:
                    self._open(fallback, private=True)
            if self._fh is not None:
                self._fh.close()
        except OSError:
            pass
        finally:
            self._fh = None
            super().close()
        return self.written_to


def _console_filter(record: logging.LogRecord) -> bool:
    return getattr(record, "mmcli_console", True)


class CommandLog:
    """The logging of one running command (see the module doc); made by :func:`command_log`."""

    def __init__(self, command: str, path: Path | None) -> None:
        self.command = command
        self.logger = get_logger()
        self.file = DeferredFileHandler(path)
        self.console = _Stderr()
        self.console.setLevel(logging.INFO)
        self.console.setFormatter(logging.Formatter("%(message)s"))
        self.console.addFilter(_console_filter)
        self.crashed = False
        self._fallback_stamp = stamp()
        self._fallback: Path | None = None

    @property
    def path(self) -> Path | None:
        return self.file.path

    def file_only(self, message: str, level: int = logging.INFO, exc_info: Any = None) -> None:
        """Record ``message`` in the log file only."""
        self.logger.log(level, message, exc_info=exc_info, extra=FILE_ONLY)

    def crash(self, exc: BaseException) -> None:
        """Record an unexpected exception with its traceback (file only); the log is then kept even when the
        command's output folder does not exist (see :func:`fallback_dir`)."""
        self.crashed = True
        self.file_only(f"internal error in `mmcli {self.command}`: {type(exc).__name__}: {exc}", logging.ERROR,
                       exc_info=(type(exc), exc, exc.__traceback__))

    def crash_log_path(self) -> Path:
        """Where the traceback of :meth:`crash` is (or will be, once the command ends) written."""
        if self.file.written_to is not None:
            return self.file.written_to
        if self.path is not None and self.path.parent.is_dir():
            return self.path
        if self._fallback is None:  # chosen once: the message and the file must name the same place
            self._fallback = fallback_dir() / f"{self.command.replace(' ', '-')}-{self._fallback_stamp}.log"
        return self._fallback


@contextmanager
def command_log(command: str, path: str | Path | None) -> Iterator[CommandLog]:
    """Route logging as the module doc says for the length of one command; restore everything after."""
    clog = CommandLog(command, Path(path) if path is not None else None)
    logger, root = clog.logger, logging.getLogger()
    saved = (logger.level, logger.propagate, list(logger.handlers), sys.unraisablehook)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.handlers = [clog.console, clog.file]
    root.addHandler(clog.file)  # other libraries' records: file only (root has no console handler of ours)
    logging.captureWarnings(True)

    def unraisable(info: Any) -> None:
        text = "".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback))
        clog.file_only(f"{info.err_msg or 'Exception ignored in'}: {info.object!r}\n{text}", logging.WARNING)

    sys.unraisablehook = unraisable
    clog.file_only(f"mmcli {command}: {' '.join(sys.argv[1:])}", logging.DEBUG)
    try:
        yield clog
    finally:
        logging.captureWarnings(False)
        root.removeHandler(clog.file)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]
        sys.unraisablehook = saved[3]
        clog.file.close(fallback=clog.crash_log_path() if clog.crashed else None)
