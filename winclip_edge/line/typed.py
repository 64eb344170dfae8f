"""Plain data (a TOML table) <-> frozen dataclasses, strictly: an unknown key, a missing one or a value of the wrong
type is refused naming its key path (``sources[1].fps_limit``), never guessed or dropped.

Field types understood: ``str``, ``int``, ``float`` (an integer is taken), ``bool`` (only true/false),
``Optional[X]`` (absent = None: TOML has no null, so None fields are left out when written), ``tuple[X, ...]``,
``Union`` of those scalars (the value keeps its own type: ``Union[str, int, float, bool]``), ``Mapping[str, X]``
(a table with keys of the user's choosing, e.g. a camera's features; the dataclass may hold it as (key, value)
pairs to keep its order in equality, it is written back as a table), nested dataclasses, and ``Any`` (passed
through). A dataclass with its own ``from_table(table, where)`` and
``to_table()`` converts itself (the station's sources and sinks, whose keys depend on their kind).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import re
import types
import typing
from typing import Any, Mapping, Union

from ..errors import WinclipError


class SpecError(WinclipError, ValueError):
    """A station spec that cannot be: ``key`` is the key path (``batching.max_batch``), ``problem`` what is wrong
    with it, ``file`` the station file it came from (None: flags or Python)."""

    def __init__(self, key: str, problem: str, file: str | None = None):
        self.key, self.problem, self.file = key, problem, file
        super().__init__(": ".join(part for part in (file, key, problem) if part))

    def at(self, prefix: str) -> "SpecError":
        """The same error one level further out (``max_batch`` -> ``batching.max_batch``)."""
        return SpecError(f"{prefix}.{self.key}" if prefix and self.key else prefix or self.key, self.problem, self.file)

    def in_file(self, file: str) -> "SpecError":
        return SpecError(self.key, self.problem, file)


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            tuple: "an array", dict: "a table"}.get(type(value), type(value).__name__)


_UNIONS = (Union, getattr(types, "UnionType", Union))  # Optional[X] and X | None


def _optional_inner(tp: Any) -> Any:
    """X for Optional[X], else None."""
    if typing.get_origin(tp) in _UNIONS:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


_SCALARS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _mapping_values(tp: Any) -> Any:
    """X for ``Mapping[str, X]`` / ``dict[str, X]``, else None."""
    if typing.get_origin(tp) in (dict, collections.abc.Mapping):
        args = typing.get_args(tp)
        if len(args) == 2 and args[0] is str:
            return args[1]
    return None


def _scalar_union(tp: Any) -> tuple | None:
    """The member types of a Union of scalars (str, int, float, bool), else None."""
    if typing.get_origin(tp) in _UNIONS:
        args = typing.get_args(tp)
        if all(a in _SCALARS for a in args):
            return args
    return None


def _one_of(members: tuple) -> str:
    """``a string, a number or a boolean`` for Union[str, int, float, bool]."""
    names = list(dict.fromkeys("a number" if m in (int, float) and float in members else _SCALARS[m] for m in members))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _table_key(key: str, name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum() and name.isascii()
    return f"{key}.{name}" if bare else f"{key}.{name!r}"


def convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp``; SpecError naming ``key`` when it is not one."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else convert(inner, value, key)
    if tp is Any:
        return value
    members = _scalar_union(tp)
    if members is not None:
        if type(value) in members:  # type(): a boolean is not an integer here
            return value
        if type(value) is int and float in members:
            return float(value)
        raise SpecError(key, f"expected {_one_of(members)}, got {_type_name(value)} {value!r}")
    values = _mapping_values(tp)
    if values is not None:
        if not isinstance(value, Mapping):
            raise SpecError(key, f"expected a table, got {_type_name(value)} {value!r}")
        return {name: convert(values, v, _table_key(key, name)) for name, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_table(tp, value, key)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SpecError(key, f"expected an array, got {_type_name(value)} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise SpecError(key, f"expected {len(args)} values, got {len(value)}")
        return tuple(convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(key, f"expected true or false, got {_type_name(value)} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpecError(key, f"expected an integer, got {_type_name(value)} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SpecError(key, f"expected a number, got {_type_name(value)} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise SpecError(key, f"expected a string, got {_type_name(value)} {value!r}")
    raise TypeError(f"{key}: field type {tp!r} is not supported by winclip_edge.line.typed")


def _hints(cls: type) -> dict[str, Any]:
    # Evaluates the annotations: a dataclass written with ``X | None`` needs Python >= 3.10 here.
    return typing.get_type_hints(cls)


def from_table(cls: type, table: Any, key: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``table``; unknown or missing keys and wrong types are SpecErrors, and so
    is whatever the dataclass itself refuses (its ``__post_init__``)."""
    own = getattr(cls, "from_table", None)
    if own is not None:
        return own(table, key)
    if not isinstance(table, Mapping):
        raise SpecError(key, f"expected a table, got {_type_name(table)} {table!r}")
    return build(cls, dict(table), key)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_text(key: Any) -> str:
    """A key as a key path shows it: bare when it can be, else quoted as TOML writes it ("" for the empty key)."""
    return key if isinstance(key, str) and _BARE_KEY.fullmatch(key) else json.dumps(str(key))


def build(cls: type, table: dict, key: str = "") -> Any:
    """``from_table`` without the class's own hook: for ``from_table`` methods that take a few keys out first."""
    hints = _hints(cls)
    init = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dot = f"{key}." if key else ""
    unknown = sorted(set(table) - set(init), key=str)
    if unknown:
        raise SpecError(f"{dot}{_key_text(unknown[0])}", f"unknown key (known here: {', '.join(init) or 'none'})")
    missing = [n for n, f in init.items() if n not in table and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{dot}{missing[0]}", "missing (this key has no default)")
    values = {name: convert(hints[name], value, f"{dot}{name}") for name, value in table.items()}
    try:
        return cls(**values)
    except SpecError as err:
        raise err.at(key) if key else err
    except (WinclipError, ValueError, TypeError) as err:
        raise SpecError(key, str(err)) from None


def to_table(obj: Any) -> Any:
    """Plain data of a dataclass (None fields left out, tuples as lists); the inverse of :func:`from_table`."""
    own = getattr(obj, "to_table", None)
    if own is not None and dataclasses.is_dataclass(obj):
        return own()
    if dataclasses.is_dataclass(obj):
        try:
            hints = _hints(type(obj))
        except (NameError, TypeError):  # annotations this module cannot evaluate: no table fields then
            hints = {}
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None and _mapping_values(hints.get(f.name)) is not None and not isinstance(value, Mapping):
                value = dict(value)  # a table held as (key, value) pairs
            if value is not None:
                out[f.name] = to_table(value)
        return out
    if isinstance(obj, Mapping):
        return {k: to_table(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_table(v) for v in obj]
    return obj
