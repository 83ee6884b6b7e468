"""Errors that map to the CLI's exit codes (0 ok, 1 per-item failures, 2 bad usage or input)."""
from __future__ import annotations


class MmcliError(Exception):
    """Base error; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(MmcliError):
    """Bad user input (file, row, value). The message names the file, the row and the fix."""

    exit_code = 2


class StoreError(MmcliError):
    """The feature store is missing, unreadable or inconsistent."""

    exit_code = 2


class DiskFullError(MmcliError):
    """No space left on the device being written (errno ENOSPC); the message names the path."""

    exit_code = 1
