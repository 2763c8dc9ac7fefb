"""Every file below a folder with its bytes, to check that a run wrote the same tree or left one untouched."""

from __future__ import annotations

import os


def read_tree(root: str) -> dict[str, bytes]:
    """``{path relative to root: contents}`` of every file below ``root``."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
