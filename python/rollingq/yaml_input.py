"""Reading YAML a user wrote, with bounds: config files and ``key=value`` overrides.

:func:`load_yaml_bounded` is ``yaml.safe_load`` that refuses, before constructing anything, a document
whose aliases expand to more than :data:`MAX_YAML_VALUES` values (nested anchors, a "billion
laughs"), a recursive alias, or nesting deeper than :data:`MAX_YAML_DEPTH`; :func:`read_yaml_file`
adds a size limit (:data:`MAX_CONFIG_BYTES`). :func:`parse_override` reads ``key=value``,
:func:`set_dotted` and :func:`deep_merge` build the nested dict a config is made from. Errors are
:class:`~rollingq.schema.ConfigError` naming the file or override, quoting values through
:func:`~rollingq.schema.echo` (bounded).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from .schema import ConfigError, clip, echo

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def deep_merge(base: dict, update: dict) -> dict:
    """Return a copy of ``base`` with ``update`` merged in recursively (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``dotted == "a.b.c"``, creating intermediate dicts."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key: expected a dotted path like 'optim.lr', got {echo(dotted)}")
    node = cfg
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{echo(dotted)}: {where} holds {echo(child)}, not a mapping of keys")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML (so ``1e-3``, ``true``, ``[a,b]`` work), with the bounds
    of :func:`load_yaml_bounded`."""
    if "=" not in text:
        raise ConfigError(f"override: expected key=value, got {echo(text)}")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml_bounded(raw, f"override {echo(text, 60)}") if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {echo(text, 60)}: the value is not valid YAML ({clip(str(exc), 200)})") from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key.strip(), value


def read_yaml_file(path: str) -> Any:
    """The YAML document of a config file (at most :data:`MAX_CONFIG_BYTES`, read by :func:`load_yaml_bounded`)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path}: {size} bytes, more than a config can be ({MAX_CONFIG_BYTES} bytes)")
        with open(path, encoding="utf-8") as f:
            return load_yaml_bounded(f.read(), f"config {path}")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot read it as YAML ({type(exc).__name__}: {clip(str(exc), 300)})"
                          ) from exc


MAX_CONFIG_BYTES = 1 << 20
"""The largest config file read (configs are a few kilobytes)."""

MAX_YAML_VALUES = 10_000
"""The most values a YAML document may hold once its aliases are expanded (a config holds about 100)."""

MAX_YAML_DEPTH = 32
"""The deepest nesting of a YAML document (a config nests 3 or 4 levels)."""


def load_yaml_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents that would be huge once their aliases are expanded (nested
    anchors, a "billion laughs"), recursive aliases, and nesting deeper than :data:`MAX_YAML_DEPTH`.

    The document is composed into nodes first (aliases stay references to one node), checked by
    :func:`check_yaml_nodes`, and only then constructed.

    Raises:
        ConfigError: naming ``source``.
        yaml.YAMLError: the text is not YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: the YAML is nested deeper than Python can read; a config nests "
                              f"at most {MAX_YAML_DEPTH} levels") from None
        if node is None:
            return None
        check_yaml_nodes(node, source)
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{source}: a value cannot be read ({type(exc).__name__}: {clip(str(exc), 200)})"
                              ) from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_yaml_nodes(root: yaml.Node, source: str, limit: int = MAX_YAML_VALUES, depth: int = MAX_YAML_DEPTH) -> None:
    """Refuse a composed YAML document that expands to more than ``limit`` values, nests deeper than
    ``depth`` or holds a recursive alias; the time taken is linear in the written document."""
    expanded: dict[int, int] = {}  # id(node) -> values below it, aliases expanded
    path: set[int] = set()
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 0)]
    while stack:
        node, finished, level = stack.pop()
        key = id(node)
        if finished:
            path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in _children(node))
            if expanded[key] > limit:
                raise ConfigError(f"{source}: its aliases (*name) expand to more than {limit} values (nested "
                                  "anchors, a 'billion laughs'); a config needs a few, write the values out")
            continue
        if key in expanded:
            continue
        if key in path:
            raise ConfigError(f"{source}: a recursive alias (an anchor used inside itself) at line "
                              f"{node.start_mark.line + 1}")
        if level > depth:
            raise ConfigError(f"{source}: the YAML is nested more than {depth} levels deep (line "
                              f"{node.start_mark.line + 1})")
        path.add(key)
        stack.append((node, True, level))
        stack.extend((c, False, level + 1) for c in _children(node) if id(c) not in expanded)
