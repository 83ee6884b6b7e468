"""The one error tree: every mmcli exception is an ``MmcliError`` with the exit code the CLI maps it to, the
structured fields render into ``str()`` without changing plain messages, and errors survive pickling (dask
workers send ``ItemError`` back to the client)."""
from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from pathlib import Path

import pytest

import mmcli
from mmcli.pipeline import errors
from mmcli.pipeline.errors import (
    ALL_ERRORS,
    DiskFullError,
    FormatError,
    InputError,
    ItemError,
    MmcliError,
    ModalityNotAvailable,
    RunFolderError,
    SlideError,
    StoreError,
    SynthInputError,
)

EXPECTED_EXIT = {MmcliError: 2, InputError: 2, StoreError: 2, FormatError: 2, ModalityNotAvailable: 2,
                 SynthInputError: 2, RunFolderError: 2, DiskFullError: 1, ItemError: 1, SlideError: 1}
# modules whose import pulls heavy optional stacks; their classes are checked through errors.py anyway
SKIP_MODULES = {"mmcli.__main__"}


def test_every_error_has_its_exit_code_and_is_in_the_tree() -> None:
    assert set(ALL_ERRORS) == set(EXPECTED_EXIT)
    for cls, code in EXPECTED_EXIT.items():
        assert issubclass(cls, MmcliError) and cls.exit_code == code, cls
    assert issubclass(SlideError, ItemError) and issubclass(FormatError, InputError)
    assert issubclass(SynthInputError, ValueError) and issubclass(ModalityNotAvailable, NotImplementedError)


def test_modules_that_used_to_define_errors_reexport_the_tree_classes() -> None:
    from mmcli.features.interop.formats import FormatError as F
    from mmcli.features.readers import SlideError as S
    from mmcli.features.runner import ItemError as I
    from mmcli.stages.extract import ModalityNotAvailable as M
    from mmcli.stages.synth import SynthInputError as Y

    assert [FormatError, SlideError, ItemError, ModalityNotAvailable, SynthInputError] == [F, S, I, M, Y]


def test_no_exception_class_outside_the_tree() -> None:
    """Every Exception subclass defined anywhere in ``mmcli`` derives from MmcliError."""
    outside = []
    for info in pkgutil.walk_packages(mmcli.__path__, "mmcli."):
        if info.name in SKIP_MODULES:
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (cuCIM, ...) missing here
            continue
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if obj.__module__ == info.name and issubclass(obj, BaseException) and not issubclass(obj, MmcliError):
                outside.append(f"{info.name}.{obj.__name__}")
    # the two stop requests (BaseExceptions on purpose, like KeyboardInterrupt) live beside the tree, in errors.py
    assert outside == ["mmcli.pipeline.errors.Interrupted", "mmcli.pipeline.errors.ItemInterrupted"]


def test_plain_messages_print_unchanged() -> None:
    msg = "labels.csv: line 3: unsafe patient_id '../x'. Fix: use only letters."
    for cls in ALL_ERRORS:
        assert str(cls(msg)) == msg


def test_structured_fields_render_once() -> None:
    e = InputError("must be >= 2, got 1", flag="folds", fix="lower --folds or add patients")
    assert str(e) == "--folds: must be >= 2, got 1. Fix: lower --folds or add patients"
    assert e.flag == "--folds" and e.fix == "lower --folds or add patients"
    p = StoreError("not a store", path=Path("/x/s.zarr"))
    assert str(p) == "/x/s.zarr: not a store" and p.path == Path("/x/s.zarr")
    # a message that already names the path / fix is not repeated
    q = InputError("/x/l.csv: empty. Fix: add rows", path="/x/l.csv", fix="add rows")
    assert str(q) == "/x/l.csv: empty. Fix: add rows"
    assert errors.flag_spelling("patch_size") == "--patch-size" and errors.flag_spelling("--param k") == "--param k"
    assert q.to_dict() == {"error": "InputError", "message": str(q), "exit_code": 2, "path": "/x/l.csv",
                           "flag": None, "fix": "add rows"}


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_pickle_with_their_fields(cls: type[MmcliError]) -> None:
    e = cls("broken", path="/a/b", fix="redo it", flag="mpp")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) and back.path == Path("/a/b") and back.flag == "--mpp"


def test_the_tree_in_the_docstring_names_every_error_class() -> None:
    """The error tree of ``mmcli/pipeline/errors.py``'s docstring stays true: every MmcliError subclass defined
    anywhere in mmcli appears in it, and the tree names no class that does not exist."""
    import re

    found = set()
    for info in pkgutil.walk_packages(mmcli.__path__, "mmcli."):
        if info.name in SKIP_MODULES:
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:
            continue
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if obj.__module__ == info.name and issubclass(obj, MmcliError):
                found.add(obj.__name__)
    tree = errors.__doc__.split("Tree", 1)[1]
    named = set(re.findall(r"[├└]── (\w+)", tree)) | {"MmcliError"}
    assert found == named, f"missing from the tree: {sorted(found - named)}; not a class: {sorted(named - found)}"
