"""Typed, strict config sections on OmegaConf structured configs (``docs/architecture.md``, Configuration).

A section is a dataclass deriving from :class:`Section`; :func:`option` gives a field its default and the
values it accepts. :func:`build` sets a YAML-shaped dict on the structured config in OmegaConf's strict mode
(flag ``convert`` off: no implicit conversions) and checks the rules; every problem is a :class:`ConfigError`
naming the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import operator
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, flag_override


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the dotted key."""


ECHO_LIMIT = 160
"""The most characters of a value an error message repeats (:func:`echo`)."""

_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict, _ECHO.maxset = 3, 8, 8, 8, 8
_ECHO.maxstring, _ECHO.maxlong, _ECHO.maxother = 80, 40, 80

INT64 = (-(2**63), 2**63 - 1)
"""The integers a config accepts: what torch, NumPy and the loaders can hold."""

_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}
_PLAIN_KEY = re.compile(r"[\w.\[\]+-]{1,160}")
_WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings")}


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (nested containers and long strings elided), so
    that an error message never repeats a huge value (a YAML alias bomb, a megabyte override)."""
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` on one line, cut in the middle to at most ``limit`` characters (for messages quoted in errors)."""
    text, half = " ".join(str(text).split()), (limit - 5) // 2
    return text if len(text) <= limit else f"{text[:half]} [...] {text[-half:]}"


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


def option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **rules: Any) -> Any:
    """A dataclass field with its default (or ``factory`` for a mutable one) and the values it accepts:
    ``choices``, bounds ``ge``, ``gt``, ``le``, ``lt``, and ``check``, which returns the text ``expected …`` of
    a problem or None."""
    if not set(rules) <= {"choices", "check", *_BOUNDS}:
        raise TypeError(f"option: unknown rules {sorted(set(rules) - {'choices', 'check', *_BOUNDS})}")
    return dataclasses.field(default=default, default_factory=factory or dataclasses.MISSING, metadata=rules)


def field_names(cls: type) -> list[str]:
    """The fields of a dataclass, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate a misspelled ``word`` most likely meant, or None: the same word in another case, an
    abbreviation either way (``learning_rate`` ~ ``lr``), a close spelling (difflib), the same letters in
    another order (``trian`` ~ ``train``)."""
    low = str(word).lower()

    def initials(w: str) -> str:
        return "".join(part[0] for part in w.split("_") if part)

    for rule in (lambda c: c.lower() == low, lambda c: c == initials(low) or initials(c) == low):
        if hit := next((c for c in candidates if rule(c)), None):
            return hit
    close = difflib.get_close_matches(low, candidates, n=1, cutoff=0.6)
    return close[0] if close else next((c for c in candidates if sorted(c) == sorted(low)), None)


def _unknown_key(prefix: str, key: Any, value: Any, valid: list[str]) -> ConfigError:
    """An unknown key, named as written (``trian.epochs``: its nested keys followed), with the closest valid key."""
    rest = ""
    while isinstance(value, Mapping) and len(value) == 1:
        (sub, value), = value.items()
        rest += f".{sub}"
    written = f"{prefix}{key}{rest}"
    written = written if _PLAIN_KEY.fullmatch(written) else echo(written)  # spaces, control characters, huge
    guess = closest(str(key), valid)
    hint = f"did you mean {prefix}{guess}{rest}?" if guess else f"expected one of {', '.join(valid)}"
    return ConfigError(f"{written}: unknown key; {hint}")


def _members(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _describe(tp: Any) -> str:
    """A field's type in words: ``an integer``, ``a string or null``, ``a number or a list of numbers``."""
    words = [f"a list of {_WORDS.get(typing.get_args(t)[0], ('', 'values'))[1]}" if typing.get_origin(t) is list
             else _WORDS.get(t, ("a plain value",))[0] for t in _members(tp) if t is not type(None)]
    return " or ".join(words) + " or null" * (type(None) in _members(tp))


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
    """Refuse OmegaConf's interpolations (``${...}``: other keys, environment variables) and missing value ``???``."""
    if isinstance(value, str) and ("${" in value or value == "???"):
        raise ConfigError(f"{key}: {echo(value)} would be an OmegaConf interpolation or missing value; a config "
                          "states its values literally (no '${' and no '???')")
    for sub in (value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()):
        _literal(sub, key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in field_names(cls)}


def _assign(node: DictConfig, raw: Any, prefix: str) -> None:
    """Set the keys of ``raw`` on the section ``node``; OmegaConf checks each value against its field's type."""
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected a mapping of keys, got {echo(raw)}")
    hints = _hints(OmegaConf.get_type(node))
    OmegaConf.set_readonly(node, False)  # a frozen dataclass is a read-only node
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key(prefix, key, value, list(hints))
        if dataclasses.is_dataclass(hints[key]):
            _assign(node[key], value, f"{prefix}{key}.")
            continue
        _literal(value, prefix + key)
        try:  # OmegaConf's strict mode (no conversion); it cannot hold a mapping in an ``Any`` field
            with flag_override(node, "convert", hints[key] is Any):
                node[key] = _widen(value, hints[key])
        except (ValueError, OverflowError):
            raise ConfigError(f"{prefix}{key}: expected {_describe(hints[key])}, got {echo(value)}") from None


def _check(section: Any, prefix: str) -> None:
    """Check every field of ``section`` (recursively): finite numbers, 64-bit integers and its :func:`option`
    rules."""
    for f in dataclasses.fields(section):
        key, value, rules = prefix + f.name, getattr(section, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            _check(value, key + ".")
            continue
        for v in value if isinstance(value, list) else [value]:
            if type(v) is float and not math.isfinite(v):
                raise ConfigError(f"{key}: expected a number, got {echo(value)} (not finite)")
            if type(v) is int and not INT64[0] <= v <= INT64[1]:
                raise ConfigError(f"{key}: expected an integer between {INT64[0]} and {INT64[1]}, got {echo(value)}")
        if "choices" in rules and value not in rules["choices"]:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, rules['choices']))}, got {echo(value)}")
        bounds = [(*_BOUNDS[name], rules[name]) for name in _BOUNDS if name in rules]
        if type(value) in (int, float) and not all(test(value, b) for _, test, b in bounds):
            kind = "an integer" if type(value) is int else "a number"
            raise ConfigError(f"{key}: expected {kind} {' and '.join(f'{op} {b}' for op, _, b in bounds)}, "
                              f"got {echo(value)}")
        if problem := rules["check"](value) if "check" in rules else None:
            raise ConfigError(f"{key}: {problem}, got {echo(value)}")


def build(schema: DictConfig, raw: Any) -> Any:
    """The section of the structured config ``schema`` (left as it is) with the keys of the nested dict ``raw`` set.

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range, naming the dotted key.
    """
    conf = copy.deepcopy(schema)  # a few times faster than OmegaConf.structured
    _assign(conf, raw, "")
    out = OmegaConf.to_object(conf)
    _check(out, "")
    return out
