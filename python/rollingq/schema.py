"""Strict config sections on pydantic v2 models (``docs/architecture.md``, Configuration).

A section is a :class:`Section`: a pydantic model in strict mode (``"3"`` is not 3, 1 is not true, 5 is not
``"5"``), refusing unknown keys and non-finite numbers. ``Field`` states a key's bounds, ``Literal`` its choices
and :func:`checked` its own check. :func:`build` validates a YAML-shaped dict; its first problem is a
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError, ValidationInfo, field_validator, model_validator


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
S = TypeVar("S", bound="Section")


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (nested containers and long strings elided), so
    that an error message never repeats a huge value (a YAML alias bomb, a megabyte override)."""
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` on one line, cut in the middle to at most ``limit`` characters (for messages quoted in errors)."""
    text, half = " ".join(str(text).split()), (limit - 5) // 2
    return text if len(text) <= limit else f"{text[:half]} [...] {text[-half:]}"


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


def _yaml_number(value: Any, tp: Any) -> Any:
    """A YAML number as a field of type ``tp`` holds it: an integral number (``1e3``) where an integer is
    expected, within 64 bits (pydantic itself takes an integer where a number is); a list's elements likewise."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if isinstance(value, list):
        inner = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
        return [_yaml_number(v, inner[0]) for v in value] if inner else value
    if type(value) is float and value.is_integer() and int in args and float not in args:
        value = int(value)
    if type(value) is int and int in args and not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"expected an integer between {INT64[0]} and {INT64[1]}")
    return value


class Section(BaseModel):
    """Base of the config sections: read like the YAML they come from (``cfg["train"]["epochs"]``)."""

    model_config = {"strict": True, "extra": "forbid", "allow_inf_nan": False}  # a pydantic ConfigDict

    @model_validator(mode="before")
    @classmethod
    def _empty(cls, raw: Any) -> Any:
        return {} if raw is None else raw  # a YAML section without keys (``train:``)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return _yaml_number(value, cls.model_fields[info.field_name].annotation)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The section as the nested dict of plain values it would be written as in YAML."""
        return self.model_dump()

    def arguments(self) -> dict[str, Any]:
        """The fields as keyword arguments of a constructor (nested sections as dicts)."""
        return self.to_dict()


def checked(problem: Callable[[Any], str | None]) -> AfterValidator:
    """A field's own check (``Annotated[type, checked(problem)]``): ``problem(value)`` is the text ``expected …``
    of what is wrong, or None."""

    def check(value: Any) -> Any:
        if text := problem(value):
            raise ValueError(text)
        return value

    return AfterValidator(check)


def build(section: type[S], raw: Any, prefix: str = "") -> S:
    """The ``section`` of the YAML-shaped ``raw`` (missing keys take their defaults), validated.

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range, named as ``prefix`` + the dotted key.
    """
    try:
        return section.model_validate(raw)
    except ValidationError as exc:  # an unknown key first (it may explain the rest), then the most specific problem
        errors = exc.errors()
    error = min(errors, key=lambda e: (e["type"] != "extra_forbidden", -len(e["loc"])))
    if isinstance(cause := error.get("ctx", {}).get("error"), ConfigError):
        raise cause  # a section's own check that names its key
    keys, fields = [], section.model_fields
    for part in error["loc"]:  # the fields; not the union members and list positions after them
        if part not in fields:
            break
        keys.append(part)
        fields = getattr(fields[part].annotation, "model_fields", {})
    if error["type"] == "extra_forbidden":
        raise _unknown_key(prefix + "".join(k + "." for k in keys), error["loc"][len(keys)], error["input"],
                           list(fields))
    message = error["msg"].removeprefix("Value error, ")
    if len(error["loc"]) == len(keys) + 1 and isinstance(error["loc"][-1], str):  # no member of a union takes it
        message = "Input should be " + " or ".join(dict.fromkeys(
            e["msg"].removeprefix("Input should be ") for e in errors if e["loc"][:-1] == tuple(keys)))
    raise ConfigError(f"{(prefix + '.'.join(keys)).rstrip('.') or 'config'}: {message[:1].lower()}{message[1:]}, "
                      f"got {echo(error['input'])}")


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
