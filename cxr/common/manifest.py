"""Per-file facts a user's manifest knows and the pixels do not: the patient (for splits) and the source.

Why `source`: a model learns whatever separates its classes, and in public chest X-ray collections the site or
dataset a film came from often does (every COVID film an adult from papers, every NORMAL film a child from one
hospital). Keeping each image's source as a column lets validation report per (source, class), hold a source
out, weight sources equally, and lets the score job notice films from a site the model never saw.

A manifest is a CSV with `patient_id` and/or `source` and a key: `sha256` (survives moved files) or
`relative_path` (relative to the input folder it describes). Several inputs may each have their own manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

NO_SOURCE = "(unknown)"   # the source of images no manifest or DICOM site names, in weights and per-source tables
KEY_COLUMNS = ("sha256", "relative_path", "rel_path", "path")
FACT_COLUMNS = ("patient_id", "source")


@dataclass(frozen=True)
class FileFacts:
    """Manifest key -> patient id and -> source; `key` says which row column the keys match: "sha256" or
    "path" (the listed file URI, built from each manifest's own input folder)."""
    patients: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None

    def of(self, row: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(patient id, source) of an image row from the manifests, (None, None) when they do not list it."""
        if self.key is None:
            return None, None
        k = row.get(self.key)
        return self.patients.get(k), self.sources.get(k)


def read_manifest_table(path: str) -> tuple[pd.DataFrame, str]:
    """(key, patient_id, source) rows of one manifest CSV and the key column it uses."""
    table = pd.read_csv(path, dtype=str)
    facts = [c for c in FACT_COLUMNS if c in table.columns]
    if not facts:
        raise ValueError(f"manifest {path} has neither a patient_id nor a source column "
                         f"(columns: {', '.join(table.columns)})")
    for key in KEY_COLUMNS:
        if key in table.columns:
            out = table[[key, *facts]].dropna(subset=[key]).drop_duplicates(subset=[key])
            out = out.rename(columns={key: "key"}).reindex(columns=["key", *FACT_COLUMNS])
            return out, ("sha256" if key == "sha256" else "relative_path")
    raise ValueError(f"manifest {path} needs a sha256 or relative_path column to match files")


def read_manifests(paths: Sequence[str], roots: Sequence[str]) -> tuple[FileFacts, dict[str, Any]]:
    """FileFacts of the manifests (empty without any) and what to record of them. Manifests keyed by relative
    path are paired with the inputs in order (one per input); sha256-keyed ones may be any number."""
    paths = [p for p in paths if p]
    info: dict[str, Any] = {"manifest": paths[0] if len(paths) == 1 else (paths or None)}
    if not paths:
        return FileFacts(), info
    tables = [read_manifest_table(p) for p in paths]
    kinds = {kind for _, kind in tables}
    if kinds == {"sha256"}:
        merged, key = pd.concat([t for t, _ in tables], ignore_index=True), "sha256"
    else:
        if kinds != {"relative_path"}:
            raise ValueError("manifests mix sha256 and relative_path keys: use one kind for all of them")
        if len(paths) != len(roots):
            raise ValueError(f"{len(paths)} manifests for {len(roots)} inputs: manifests that match files by "
                             "relative_path need one per input, in the same order (or match by sha256)")
        parts = [table.assign(key=root.rstrip("/") + "/" + table["key"].str.lstrip("/"))
                 for (table, _), root in zip(tables, roots)]
        merged, key = pd.concat(parts, ignore_index=True), "path"
    merged = merged.drop_duplicates(subset=["key"])
    patients = merged.dropna(subset=["patient_id"])
    sources = merged.dropna(subset=["source"])
    info.update(matched_by=key, manifest_rows=int(len(merged)),
                sources=sorted(sources["source"].unique().tolist()))
    return FileFacts(dict(zip(patients["key"], patients["patient_id"])),
                     dict(zip(sources["key"], sources["source"])), key), info


def source_names(sources) -> np.ndarray:
    """Sources as strings, NO_SOURCE where unknown (None or NaN)."""
    return np.asarray([NO_SOURCE if s is None or (isinstance(s, float) and np.isnan(s)) else str(s)
                       for s in sources], dtype=object)


def site_source(site_key: str | None) -> str | None:
    """The `source` of a DICOM no manifest describes: its keyed site (cxr.scope.dicom_header's site_key), short
    enough to read, long enough not to collide between a few thousand sites."""
    return f"site:{site_key[:16]}" if site_key else None
