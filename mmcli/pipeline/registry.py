"""One registry idiom for everything mmcli looks up by name (timm-style).

Encoders, heads, fusion operators, slide readers, interop formats, store backends, modalities and
preprocessors each have one :class:`Registry`. An implementation registers itself with a decorator::

    HEADS = Registry("head", providers=("mmcli.heads.models.xgboost", ...))

    @HEADS.register("xgboost", tasks=("binary", "multiclass", "survival"))
    class XGBoostHead(Head): ...

Registering costs nothing at start-up: ``providers`` are the modules that hold the implementations, and
they are imported only when a name is looked up. ``lazy(name, "module")`` ties a name to the one module
that defines it, so looking up ``xgboost`` imports the xgboost head and not the torch heads.
``names()`` and ``describe()`` list what is there, so a choice list can be derived from the registry instead of
copied: the "unknown NAME" error of :meth:`Registry.entry` lists ``names()``. With :meth:`Registry.scan` the lazy
table is derived from the decorators, so a name is written once, in its decorator (heads, modalities, store
backends); ``lazy`` lines kept by hand write a name twice.
"""
from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from mmcli.pipeline.errors import InputError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered implementation and what the registry knows about it without importing more."""

    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> implementation, with lazy imports of the modules that register them.

    Args:
        kind: what is registered, for messages (``"head"``, ``"encoder"``).
        providers: modules imported on the first lookup of a name that is not registered yet.
        flag: the CLI flag that takes these names (``"--head"``), for messages.
    """

    def __init__(self, kind: str, providers: Iterable[str] = (), flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag or f"--{kind}"
        self._providers: list[str] = list(providers)
        self._lazy: dict[str, str] = {}
        self._aliases: dict[str, str] = {}  # lower-cased alias -> name
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    # ---- registering ----------------------------------------------------------------------------------------
    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` with descriptive ``meta`` (e.g. ``modality="wsi"``)."""

        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        """Register ``obj`` under ``name``; ``meta["aliases"]``: other names users may type for it."""
        old = self._entries.get(name)
        if old is not None and old.obj is not obj and _qualname(old.obj) != _qualname(obj):
            raise ValueError(f"{self.kind} {name!r} registered twice ({_qualname(old.obj)}, {_qualname(obj)})")
        self._entries[name] = Entry(name, obj, meta)
        for alias in meta.get("aliases", ()):
            self._aliases[alias.lower()] = name

    def lazy(self, name: str, module: str) -> None:
        """``name`` is defined in ``module``, imported the first time ``name`` is looked up."""
        self._lazy[name] = module

    def scan(self, folder: str | Path, package: str, decorator: str) -> None:
        """Tie every name registered in the modules of ``folder`` (the package ``package``) with
        ``@decorator("name", ...)`` to its module, by reading the modules' source (nothing is imported): the
        name is written once, in its decorator, and the lazy table is derived from it."""
        for f in sorted(Path(folder).glob("*.py")):
            if f.name.startswith("_"):
                continue
            for name, aliases in decorated_names(f.read_text(encoding="utf-8"), decorator):
                self.lazy(name, f"{package}.{f.stem}")
                for alias in aliases:
                    self._aliases[alias.lower()] = name

    def lazy_names(self) -> frozenset[str]:
        """Names tied to a module by :meth:`lazy` or :meth:`scan`, known without importing anything."""
        return frozenset(self._lazy)

    # ---- looking up -------------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        return self.entry(name).obj

    def canonical(self, name: str) -> str:
        """The registered name a user means: ``name`` itself, the same in another case, or a declared alias
        (``abmil`` -> ``attention_mil``); InputError with the choices and the closest ones otherwise."""
        if name in self._entries or name in self._lazy:
            return name
        for known in [*self._entries, *self._lazy]:
            if known.lower() == name.lower():
                return known
        if name.lower() in self._aliases:
            return self._aliases[name.lower()]
        self._load_all()
        if name in self._entries:
            return name
        if name.lower() in self._aliases:
            return self._aliases[name.lower()]
        choices = self.names()
        close = difflib.get_close_matches(name.lower(), [*choices, *self._aliases], n=3, cutoff=0.6)
        meant = dict.fromkeys(self._aliases.get(c, c) for c in close)  # a name and its alias: one suggestion
        hint = f" Did you mean {' or '.join(repr(c) for c in meant)}?" if close else ""
        raise InputError(f"unknown {self.kind} {name!r}.{hint} Fix: {self.flag} takes one of {choices}.")

    def declared(self) -> list[str]:
        """The names registered or declared lazily, sorted, without importing anything (for help texts)."""
        return sorted({*self._entries, *self._lazy})

    def aliases(self) -> dict[str, str]:
        """``{alias: name}`` of every declared alias."""
        self._load_all()
        return dict(self._aliases)

    def entry(self, name: str) -> Entry[T]:
        name = self.canonical(name)
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        if name not in self._entries:
            self._load_all()
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}. Fix: {self.flag} takes one of {self.names()}.")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.entry(name)
        except InputError:
            return False
        return True

    def names(self, **where: Any) -> list[str]:
        """Registered names, sorted; ``where`` filters on meta (``names(modality="wsi")``)."""
        self._load_all()
        return sorted(n for n, e in self._entries.items() if all(e.meta.get(k) == v for k, v in where.items()))

    def describe(self) -> dict[str, dict[str, Any]]:
        """``{name: meta + the first docstring line}`` of everything registered."""
        self._load_all()
        out = {}
        for n in self.names():
            e = self._entries[n]
            doc = (getattr(e.obj, "__doc__", None) or "").strip().splitlines()
            out[n] = {**e.meta, "summary": doc[0] if doc else ""}
        return out

    def _load_all(self) -> None:
        if self._loaded:
            return
        for mod in [*self._providers, *sorted(set(self._lazy.values()))]:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # the module exists but one of its dependencies is missing: say so
                    raise
        self._loaded = True


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def decorated_names(source: str, decorator: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, aliases)`` of every ``@decorator("name", ..., aliases=("a", ...))`` that starts a line of
    ``source`` (a module-level class or function, the only place mmcli registers anything; an indented example
    in a docstring is not one): the first argument, a string literal, and the string literals of an
    ``aliases=(...)`` keyword in the same call. Regular expressions rather than ``ast.parse``: a registry's
    import reads its modules' source on every start, and parsing them cost 20 ms for three modules."""
    out = []
    for m in re.finditer(rf"^@{re.escape(decorator)}\(\s*([\"'])([^\"'\n]+)\1([^\n]*(?:\n[ \t]+[^\n]*)*)",
                         source, re.MULTILINE):
        found = re.search(r"aliases\s*=\s*[(\[]([^)\]]*)[)\]]", m.group(3))
        aliases = tuple(re.findall(r"[\"']([^\"']+)[\"']", found.group(1))) if found else ()
        out.append((m.group(2), aliases))
    return out
