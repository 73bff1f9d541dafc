"""Where tonight's films come from, against where the model's training films came from.

Why: a model's calls hold for the population it learnt from (its model card). Films from a site the model never
saw (another hospital, another scanner's DICOM site key, a collection named in score.source) are exactly where a
shortcut learnt from the training sources fails silently: the run record, the run page and monitoring say so,
and `--fail-on-drift` turns it into exit code 4.
"""
from __future__ import annotations

from typing import Any, Mapping

from cxr.common.manifest import NO_SOURCE

UNSEEN = "unseen source"   # the name monitoring lists among what drifted


def check(counts: Mapping[Any, int], card: Mapping[str, Any] | None) -> dict[str, Any]:
    """{counts: {source: scored films}, model_sources, unseen: [source], warnings: [text]} of a run's predictions
    per source (None / NaN: unknown) and the model card (None: the model has none, nothing to compare)."""
    by = {}
    for source, n in counts.items():
        name = NO_SOURCE if source is None or source != source else str(source)
        by[name] = by.get(name, 0) + int(n)
    seen = sorted(card.get("sources") or []) if card else None
    unseen = sorted(s for s in by if seen is not None and s != NO_SOURCE and s not in seen)
    warnings = [f"{by[s]} films from {s}, a source this model never saw in training (it learnt from "
                f"{', '.join(seen)}): its calls there are untested; check it on labelled films of this site "
                "(jobs/evaluate.py --external) before trusting them" for s in unseen]
    if by.get(NO_SOURCE):
        warnings.append(f"{by[NO_SOURCE]} films without a known source: set --source (conf score.source), or give "
                        "DICOM files a site secret, to check them against the model's training sources")
    if seen is None and by:
        warnings.append("the model has no model card: its training sources are unknown")
    return {"counts": dict(sorted(by.items())), "model_sources": seen, "unseen": unseen, "warnings": warnings}
