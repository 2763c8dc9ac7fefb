"""Typed, strict config sections: dataclasses validated as OmegaConf structured configs.

A section is a dataclass deriving from :class:`Section`; each field holds its type, its default and,
through :func:`option`, the values it accepts. :func:`build` sets the keys of a YAML-shaped dict on
``OmegaConf.structured(section)``, one key at a time, so that OmegaConf checks each value against the
field's type (with its implicit conversions, ``"3"`` to 3 or 1 to true, refused), then instantiates
the dataclasses and checks the choices and bounds. Every problem is a :class:`ConfigError` naming the
dotted key: an unknown key (with the closest valid key suggested), a value of the wrong type, one out
of range. OmegaConf never parses text here (YAML is read by :mod:`rollingq.yaml_input`, bounded), and
``${...}`` interpolations and ``???`` are refused: a config states its values literally.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import reprlib
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


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


class Section:
    """Base of the config dataclasses: read like the YAML they come from (``cfg["train"]["epochs"]``)."""

    def __getitem__(self, key: str) -> Any:
        if key not in field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The section as the nested dict of plain values it would be written as in YAML."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.to_dict() if isinstance(v, Section) else copy.deepcopy(v) for k, v in values.items()}

    def arguments(self) -> dict[str, Any]:
        """The fields as keyword arguments of a constructor (nested sections as dicts)."""
        return self.to_dict()


def option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
           choices: tuple | None = None, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with its default (or ``factory`` for a mutable one) and the values it accepts:
    ``choices``, bounds of a number (``>=``, ``>``, ``<=``, ``<``), and ``check``, which returns the text
    ``expected …`` of a problem or None."""
    meta = {k: v for k, v in {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check}.items()
            if v is not None}
    return dataclasses.field(default=default, default_factory=factory or dataclasses.MISSING, metadata=meta)


def field_names(cls: type) -> list[str]:
    """The fields of a dataclass, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def join(prefix: str, key: Any) -> str:
    """``prefix.key`` (just ``key`` at the top)."""
    return f"{prefix}.{key}" if prefix else str(key)


def _initials(word: str) -> str:
    return "".join(part[0] for part in word.split("_") if part)


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate a misspelled ``word`` most likely meant, or None: the same word in another case, an
    abbreviation either way (``learning_rate`` ~ ``lr``), a close spelling (difflib), the same letters in
    another order (``trian`` ~ ``train``)."""
    low = str(word).lower()
    for rule in (lambda c: c.lower() == low, lambda c: c == _initials(low) or _initials(c) == low):
        for c in candidates:
            if rule(c):
                return c
    close = difflib.get_close_matches(low, candidates, n=1, cutoff=0.6)
    return close[0] if close else next((c for c in candidates if sorted(c) == sorted(low)), None)


def unknown_key_error(prefix: str, key: Any, value: Any, valid: list[str]) -> ConfigError:
    """The error for an unknown key at ``prefix``: names it as written (``trian.epochs``, following the nested
    keys of ``value``) and suggests the closest valid key."""
    rest = ""
    while isinstance(value, Mapping) and len(value) == 1:
        (sub, value), = value.items()
        rest += f".{sub}"
    written = join(prefix, f"{key}{rest}")
    if not _PLAIN_KEY.fullmatch(written):  # spaces, control characters, a huge key: quoted and cut
        written = echo(written)
    guess = closest(str(key), valid)
    hint = f"did you mean {join(prefix, guess)}{rest}?" if guess else f"expected one of {', '.join(valid)}"
    return ConfigError(f"{written}: unknown key; {hint}")


def _members(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _describe(tp: Any) -> str:
    if len(_members(tp)) > 1:
        args = _members(tp)
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (" or null" * (type(None) in args))
    if typing.get_origin(tp) is list:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(tp)[0], 'values')}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "a plain value")


def _widen(value: Any, tp: Any) -> Any:
    """A YAML number as the field's type holds it: an integer where a number is expected, an integral number
    (``1e3``) where an integer is; the elements of a list likewise."""
    args = _members(tp)
    if isinstance(value, list):
        inner = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
        return [_widen(v, inner[0]) for v in value] if inner else value
    if type(value) is int and float in args and int not in args:
        return float(value)  # OverflowError beyond the float range: the caller's type error
    if type(value) is float and value.is_integer() and int in args and float not in args:
        return int(value)
    return value


def _literal(value: Any, key: str) -> None:
    """Refuse the strings OmegaConf would not take literally: interpolations (``${...}``, which can read
    environment variables and other keys) and its missing value ``???``."""
    if isinstance(value, str) and ("${" in value or value == "???"):
        raise ConfigError(f"{key}: {echo(value)} would be an OmegaConf interpolation or missing value; a config "
                          "states its values literally (no '${' and no '???')")
    for sub in (value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()):
        _literal(sub, key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The types of the fields of the dataclass ``cls``, in order."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in field_names(cls)}


def assign(node: DictConfig, raw: Any, prefix: str = "") -> None:
    """Set the keys of the YAML-shaped ``raw`` on the structured config ``node`` (a section), recursively.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming the dotted key.
    """
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {echo(raw)}")
    hints = _hints(OmegaConf.get_type(node))
    names = list(hints)
    OmegaConf.set_readonly(node, False)  # a frozen dataclass is a read-only node
    for key, value in raw.items():
        path = join(prefix, key)
        if key not in names:
            raise unknown_key_error(prefix, key, value, names)
        if dataclasses.is_dataclass(hints[key]):
            assign(node[key], value, path)
            continue
        _literal(value, path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # OmegaConf warns before an implicit conversion
                node[key] = _widen(value, hints[key])
        except (ValueError, OverflowError, FutureWarning):
            raise ConfigError(f"{path}: expected {_describe(hints[key])}, got {echo(value)}") from None


def _check_value(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """A typed value against the bounds no type states: finite numbers, 64-bit integers, ``meta``'s rules."""
    for v in value if isinstance(value, list) else [value]:
        if type(v) is float and not math.isfinite(v):
            raise ConfigError(f"{key}: expected a number, got {echo(value)} (not finite)")
        if type(v) is int and not INT64[0] <= v <= INT64[1]:
            raise ConfigError(f"{key}: expected an integer between {INT64[0]} and {INT64[1]}, got {echo(value)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, meta['choices']))}, got {echo(value)}")
    bounds = [(k, op, meta[k]) for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    if type(value) in (int, float) and not all(
            {"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, _, b in bounds):
        kind = "an integer" if type(value) is int else "a number"
        raise ConfigError(f"{key}: expected {kind} {' and '.join(f'{op} {b}' for _, op, b in bounds)}, "
                          f"got {echo(value)}")
    problem = meta["check"](value) if "check" in meta else None
    if problem:
        raise ConfigError(f"{key}: {problem}, got {echo(value)}")


def check(section: Section, prefix: str = "") -> None:
    """Check every field of ``section`` (recursively) against its :func:`option` rules, naming the dotted key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check(value, join(prefix, f.name))
        else:
            _check_value(value, f.metadata, join(prefix, f.name))


def build(schema: DictConfig, raw: Any, prefix: str = "") -> Any:
    """The section of the structured config ``schema`` (left as it is) with the keys of the nested dict ``raw`` set.

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range, naming the dotted key.
    """
    conf = copy.deepcopy(schema)  # a few times faster than OmegaConf.structured
    assign(conf, raw, prefix)
    out = OmegaConf.to_object(conf)
    check(out, prefix)
    return out
