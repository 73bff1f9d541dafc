"""Class labels from folder names, as public CXR sets lay them out.

Handles `COVID/ NORMAL/ VIRAL/`, the study's `COVID_IEEE/{covid,normal,virus}/`, `train|test/{COVID19,PNEUMONIA,NORMAL}/`
and `Viral Pneumonia/images/` (the deepest folder that names a class wins; other folders such as `images`,
`train` or a hospital name are passed over). An archive without class folders is valid: its label is None.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

_SEPARATORS = re.compile(r"[\s_\-.]+")


def normalise_name(name: str) -> str:
    """'Viral Pneumonia', 'viral_pneumonia' and 'VIRAL-PNEUMONIA' are one folder name."""
    return _SEPARATORS.sub("", name.strip().lower())


def alias_table(labels: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{normalised folder name: class}; the class name itself is always an alias of itself."""
    table: dict[str, str] = {}
    for cls, aliases in labels.items():
        for alias in [cls, *aliases]:
            key = normalise_name(alias)
            if table.get(key, cls) != cls:
                raise ValueError(f"folder name {alias!r} is configured for both {table[key]} and {cls}")
            table[key] = cls
    return table


def infer_label(relative_path: str, aliases: Mapping[str, str]) -> str | None:
    """Class of a file from its path relative to the input root, or None when no folder names a class."""
    folders = relative_path.replace("\\", "/").split("/")[:-1]
    for folder in reversed(folders):
        cls = aliases.get(normalise_name(folder))
        if cls is not None:
            return cls
    return None
