"""The scope gate: which files a chest X-ray model may be asked about, judged from the DICOM header.

Why: a PACS export mixes frontal chest films with laterals, CT and MR series, other body parts, secondary
captures and objects without pixels. A model trained on frontal chest radiographs gives each of them a confident
class anyway, so such files are never decoded or scored: they become `out_of_scope` rows whose reason says which
tag put them there, for a person to act on. Files that are not DICOM carry no tags; only the out-of-distribution
distance (cxr.scope.ood) can speak for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from cxr.image.decode import sniff_format
from cxr.scope.dicom_header import DicomHeader, HeaderReader, empty_columns
from cxr.scope.frontal import FrontalCheck

OOD_ACTIONS = ("flag", "skip")
STAGE = "scope"        # the stage column of a row the header rules put out of scope
OOD_STAGE = "ood"      # ... and of one the distance put out of scope (scope.ood: skip)
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT")
RADIOGRAPHS = ("CR", "DX")


def _upper(values) -> tuple[str, ...]:
    return tuple(str(v or "").strip().upper() for v in (values or ()))


@dataclass(frozen=True)
class ScopeRules:
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "")
    views: tuple[str, ...] = ("PA", "AP", "")
    multi_frame: bool = False
    ood: str = "flag"

    def __post_init__(self):
        if self.ood not in OOD_ACTIONS:
            raise ValueError(f"scope.ood must be one of {', '.join(OOD_ACTIONS)}, got {self.ood!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "ScopeRules":
        """From conf's `scope:` section; keyword overrides (the jobs' flags) win when not None."""
        scope = dict(config.get("scope") or {})
        scope.update({k: v for k, v in overrides.items() if v is not None})
        d = cls()
        return cls(modalities=_upper(scope.get("modalities", d.modalities)),
                   body_parts=_upper(scope.get("body_parts", d.body_parts)),
                   views=_upper(scope.get("views", d.views)),
                   multi_frame=bool(scope.get("multi_frame", d.multi_frame)),
                   ood=str(scope.get("ood", d.ood)))

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "body_parts": list(self.body_parts), "views": list(self.views),
                "multi_frame": self.multi_frame, "ood": self.ood}

    def reason(self, header: DicomHeader | None) -> str | None:
        """Why this file is out of scope, in words a person can act on; None when it is in scope (or not DICOM)."""
        if header is None:
            return None
        cols = header.columns
        modality = (cols.get("modality") or "").upper()
        if not header.has_pixels:
            if modality in (self.modalities or RADIOGRAPHS):
                return None   # a radiograph whose pixels are missing (cut short): broken, the decoder says so
            kind = f" ({modality} object)" if modality else ""
            return f"no pixel data{kind}: not an image (structured report, presentation state, ...)"
        if self.modalities and modality not in self.modalities:
            what = f"Modality {modality}" if modality else "no Modality tag"
            return f"{what}: not a radiograph (scope.modalities: {', '.join(m or '(empty)' for m in self.modalities)})"
        part = (cols.get("body_part_examined") or "").upper()
        if self.body_parts and part not in self.body_parts:
            return (f"BodyPartExamined {part}: not a chest image "
                    f"(scope.body_parts: {', '.join(p or '(empty)' for p in self.body_parts)})")
        view = (cols.get("view_position") or "").upper()
        if self.views and view not in self.views:
            what = "lateral view" if view in LATERAL_VIEWS else "not a frontal view"
            return f"ViewPosition {view}: {what} (scope.views: {', '.join(v or '(empty)' for v in self.views)})"
        frames = cols.get("number_of_frames") or 1
        if frames > 1 and not self.multi_frame:
            return (f"NumberOfFrames {frames}: a multi-frame object (a CT/MR stack, cine or tomosynthesis), not one "
                    "radiograph (scope.multi_frame)")
        return None


@dataclass(frozen=True)
class ScopeGate:
    """What a worker needs to judge one file: the header reader (with the site secret) and the rules, before
    decoding it; the frontal-film check (conf scope.frontal; None: off), after preprocessing it, and whether to
    measure the raw film's frame (conf scope.frame, cxr.image.frame) (the score job). Both jobs ship one to their
    Python workers."""
    reader: HeaderReader
    rules: ScopeRules
    frontal: FrontalCheck | None = None
    frame: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ScopeGate":
        return cls(HeaderReader.from_config(config), ScopeRules.from_config(config), FrontalCheck.from_config(config),
                   bool((config.get("scope") or {}).get("frame", True)))

    def check(self, data: bytes) -> tuple[dict[str, Any], str | None]:
        """(DICOM columns, all null for other files; why the file is out of scope, or None)."""
        if sniff_format(data) != "DICOM":
            return empty_columns(), None
        header = self.reader.read(data)
        return (header.columns if header else empty_columns()), self.rules.reason(header)
