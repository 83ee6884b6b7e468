"""Names written once, in their decorator: the lazy tables that ``Registry.scan`` derives from the source are
exactly what the modules register when imported (heads, modalities, store backends)."""
from __future__ import annotations

import importlib

import pytest

from mmcli.pipeline.registry import decorated_names


def test_decorated_names_reads_module_level_decorators_only() -> None:
    source = '''"""Docs::

    @register("in_a_docstring", unit="x")
"""
@register("wsi", options=WsiOptions, unit="tile")
def a(): ...


@register(
    'mri', unit="step")
class B: ...


@register_head("not_this_decorator")
class C: ...


@register(NAME)
def d(): ...
'''
    assert decorated_names(source, "register") == [("wsi", ()), ("mri", ())]
    assert decorated_names(source, "register_head") == [("not_this_decorator", ())]
    aliased = '@register_head("attention_mil", aliases=("abmil", "gated_abmil"))\nclass A: ...\n'
    assert decorated_names(aliased, "register_head") == [("attention_mil", ("abmil", "gated_abmil"))]


@pytest.mark.parametrize("module,registry", [("mmcli.heads.registry", "HEADS"),
                                             ("mmcli.features.modalities", "MODALITIES"),
                                             ("mmcli.pipeline.store.interface", "STORE_BACKENDS")])
def test_scanned_lazy_tables_equal_what_the_modules_register(module: str, registry: str) -> None:
    reg = getattr(importlib.import_module(module), registry)
    lazy = dict(reg._lazy)
    assert lazy, "nothing scanned"
    assert sorted(lazy) == reg.names()  # imports every module of the table
    for name, mod in lazy.items():
        obj = reg.get(name)
        defined_in = getattr(obj, "__module__", None) or type(obj).__module__
        if registry == "MODALITIES":  # a Modality record: its factory is what the module defines
            defined_in = obj.make_spec.__module__
        assert defined_in == mod, (name, defined_in, mod)
