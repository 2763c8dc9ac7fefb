"""Typed, strict config sections: dataclasses built from YAML-shaped dicts.

A section is a dataclass deriving from :class:`Section`; each field holds its
type, its default and, through :func:`option`, its allowed values. :func:`build`
makes a section from a nested dict and raises :class:`ConfigError` naming the
dotted key of the first problem: an unknown key (with the closest valid key
suggested), a value of the wrong type, or one out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the dotted key."""


ECHO_LIMIT = 160
"""The most characters of a value an error message repeats (:func:`echo`)."""

_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict, _ECHO.maxset = 3, 8, 8, 8, 8
_ECHO.maxstring, _ECHO.maxlong, _ECHO.maxother = 80, 40, 80

INT64 = (-(2**63), 2**63 - 1)
"""The integers a config accepts: what torch, NumPy and the loaders can hold."""


_PLAIN_KEY = re.compile(r"[\w.\[\]+-]{1,160}")


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (nested containers and long strings elided), so
    that an error message never repeats a huge value (a YAML alias bomb, a megabyte override)."""
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` on one line, cut in the middle to at most ``limit`` characters (for messages quoted in errors)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} [...] {text[-half:]}"


def check_int64(value: int, key: str) -> int:
    """``value`` if it fits in 64 bits (:data:`INT64`), else a :class:`ConfigError` naming ``key``."""
    if not INT64[0] <= value <= INT64[1]:
        raise ConfigError(f"{key}: expected an integer between {INT64[0]} and {INT64[1]}, got {echo(value)}")
    return value


class Section:
    """Base of the config dataclasses: read like the YAML they come from (``cfg["train"]["epochs"]``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The section as the nested dict of plain values it would be written as in YAML."""
        return {name: plain(getattr(self, name)) for name in field_names(type(self))}

    def arguments(self) -> dict[str, Any]:
        """The fields as keyword arguments of a constructor (nested sections as dicts)."""
        return self.to_dict()


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with its default and the values it accepts.

    Args:
        default: the default value (or ``factory`` for a mutable one).
        choices: the allowed values.
        ge, gt, le, lt: bounds of a number (``>=``, ``>``, ``<=``, ``<``).
        check: returns the text ``expected …`` of a problem, or None when the value is fine.
    """
    meta = {k: v for k, v in {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check}.items()
            if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_names(cls: type) -> list[str]:
    """The init fields of a dataclass, in order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def plain(value: Any) -> Any:
    """Sections to dicts, tuples to lists, recursively; other values unchanged."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def join(prefix: str, key: Any) -> str:
    """``prefix.key`` (just ``key`` at the top)."""
    return f"{prefix}.{key}" if prefix else str(key)


def _initials(word: str) -> str:
    return "".join(part[0] for part in word.split("_") if part)


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate a misspelled ``word`` most likely meant, or None.

    Tries, in order: the same word in another case, an abbreviation either
    way (``learning_rate`` ~ ``lr``), a close spelling (difflib), the same
    letters in another order (``trian`` ~ ``train``).
    """
    low = str(word).lower()
    for rule in (
        lambda c: c.lower() == low,
        lambda c: c == _initials(low) or _initials(c) == low,
    ):
        for c in candidates:
            if rule(c):
                return c
    close = difflib.get_close_matches(low, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    return next((c for c in candidates if sorted(c) == sorted(low)), None)


def _leaf_path(key: Any, value: Any) -> str:
    """``key`` followed by the first nested keys of ``value`` (what the user wrote: ``trian.epochs``)."""
    path = str(key)
    while isinstance(value, Mapping) and len(value) == 1:
        (sub, value), = value.items()
        path += f".{sub}"
    return path


def unknown_key_error(prefix: str, key: Any, value: Any, valid: list[str], elsewhere: str | None = None) -> ConfigError:
    """The error for an unknown key at ``prefix``: names it and suggests the closest valid key."""
    written = join(prefix, _leaf_path(key, value))
    if not _PLAIN_KEY.fullmatch(written):  # spaces, control characters, a huge key: quoted and cut
        written = echo(written)
    guess = closest(str(key), valid)
    if guess is not None:
        rest = written[len(join(prefix, key)):]
        hint = f"; did you mean {join(prefix, guess)}{rest}?"
    elif elsewhere is not None:
        hint = f"; did you mean {elsewhere}?"
    else:
        hint = f"; expected one of {', '.join(valid)}"
    return ConfigError(f"{written}: unknown key{hint}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    if origin is list:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    return " and ".join(parts)


def _check_meta(value: Any, tp: Any, meta: Mapping[str, Any], key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, meta['choices']))}, got {echo(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = all((
            "ge" not in meta or value >= meta["ge"], "gt" not in meta or value > meta["gt"],
            "le" not in meta or value <= meta["le"], "lt" not in meta or value < meta["lt"],
        ))
        if not ok:
            raise ConfigError(f"{key}: expected {_describe(tp)} {_bounds_text(meta)}, got {echo(value)}")
    if "check" in meta:
        problem = meta["check"](value)
        if problem:
            raise ConfigError(f"{key}: {problem}, got {echo(value)}")


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and not isinstance(value, bool):
        if isinstance(value, int):
            return check_int64(value, key)
        if isinstance(value, float) and value.is_integer():
            return check_int64(int(value), key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key}: expected a finite number, got {echo(value)}") from None
        if math.isfinite(number):
            return number
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {echo(value)}")


def convert(value: Any, tp: Any, meta: Mapping[str, Any], key: str) -> Any:
    """``value`` checked against the type ``tp`` and the field's ``meta`` (see :func:`option`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Section):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_describe(tp)}, got null")
        for arg in (a for a in args if a is not type(None)):
            try:
                out = convert(value, arg, {}, key)
            except ConfigError:
                continue
            _check_meta(out, arg, meta, key)
            return out
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {echo(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {echo(value)}")
        out = [convert(v, args[0], {}, f"{key}[{i}]") for i, v in enumerate(value)]
        _check_meta(out, tp, meta, key)
        return out
    out = _scalar(value, tp, key)
    _check_meta(out, tp, meta, key)
    return out


def build(cls: type[T], raw: Any, prefix: str = "") -> T:
    """The section ``cls`` from a nested dict; missing keys take their defaults.

    A class may define ``from_raw(raw, prefix)`` to build itself (a section
    whose keys depend on one of its values).

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range, naming the dotted key.
    """
    custom = getattr(cls, "from_raw", None)
    if custom is not None:
        return custom(raw, prefix)
    return build_fields(cls, raw, prefix)


def build_fields(cls: type[T], raw: Any, prefix: str = "", extra: Mapping[str, Any] | None = None) -> T:
    """:func:`build` without the ``from_raw`` hook; ``extra`` are finished keyword arguments."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {echo(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = dict(extra or {})
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key_error(prefix, key, value, list(fields))
        kwargs[key] = convert(value, hints[key], fields[key].metadata, join(prefix, key))
    return cls(**kwargs)
