"""external.md: a model's numbers on a user's own labelled archive beside its cross-validated estimate.

Why beside: an external archive of a few hundred films gives intervals several points wide, and a
cross-validation on the training sources is an estimate for those sources only. Read together they say whether
the model holds on this site (inside the estimate's spread) or has met a population it did not learn (well
below it, often in one class or one source).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from cxr import CLASSES
from cxr.evaluate.by_source import table
from cxr.evaluate.metrics import wilson_interval


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(k: int, n: int) -> str:
    if not n:
        return "n/a"
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def _estimate(name: str, metric: str, crossvals: Sequence[Mapping[str, Any]], card: Mapping[str, Any] | None) -> str:
    """mean ± sd of a metric in the first patient-grouped cross-validation that has the model, else the card's."""
    for cv in crossvals:
        if cv.get("group_by", "patient") == "patient":
            s = (cv.get("summary") or {}).get(name, {}).get(metric)
            if s and s.get("mean") is not None:
                return f"{s['mean']:.3f} ± {s['sd']:.3f}"
    s = ((card or {}).get("crossval_summary") or {}).get(name, {}).get(metric)
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s and s.get("mean") is not None else "n/a"


def format_external(archive: str, evaluation: Mapping[str, Any], crossvals: Sequence[Mapping[str, Any]],
                    cards: Mapping[str, Mapping[str, Any]]) -> str:
    data = evaluation["data"]
    lines = ["# External evaluation", "",
             f"- archive: `{archive}`: {data['images']} labelled images "
             f"({', '.join(f'{c} {n}' for c, n in data['classes'].items())}), {data['patients']} patients; every "
             "labelled image evaluated (none of them trained the models: check the archive shares no patient with the "
             "training data)",
             "- brackets: 95% Wilson intervals; cross-validated estimate: mean ± sd over folds x seeds of the "
             "patient-grouped cross-validation on the training sources (`--crossval`, else the model card)", ""]
    lines += [f"> **Warning:** {w}" for w in evaluation.get("warnings") or []]
    for name, s in evaluation["models"].items():
        if s.get("member_of"):
            continue
        n = s["n"]
        correct = int(round((s["accuracy"] or 0) * n))
        lines += ["", f"## {name}", "",
                  "| metric | this archive | cross-validated estimate |", "|---|---|---|",
                  f"| accuracy | {_ci(correct, n)} | {_estimate(name, 'accuracy', crossvals, cards.get(name))} |",
                  f"| macro-F1 | {_f(s['macro_f1'])} | {_estimate(name, 'macro_f1', crossvals, cards.get(name))} |"]
        for c in CLASSES:
            pc = s["per_class"][c]
            k = int(round((pc["sensitivity"] or 0) * pc["support"]))
            lines.append(f"| recall {c} | {_ci(k, pc['support'])} | "
                         f"{_estimate(name, f'sensitivity_{c}', crossvals, cards.get(name))} |")
        if s.get("by_source"):
            lines += ["", table(s["by_source"], title="per source and class")]
        unseen = sorted({r["source"] for r in s.get("by_source") or []}
                        - set((cards.get(name) or {}).get("sources") or []))
        if cards.get(name) and unseen:
            lines += ["", f"Sources this model never saw in training: {', '.join(unseen)}."]
    lines += ["", "Research software, not a diagnostic device.", ""]
    return "\n".join(lines)
