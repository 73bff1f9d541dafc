"""The model card: what a model was trained on, how it did per source, and what it has never seen.

Why: a chest X-ray model's calls are only as general as its training population. One trained on children's
NORMAL films and adults' COVID films learns "adult = COVID"; the numbers on its own test split cannot show that.
The card says, per class, which sources, how many films and patients, which population (where conf's `sources`
section knows it), views, original sizes and formats it learnt from, its per-(source, class) recall, the
leave-one-source-out results when a cross-validation is given, and the plain limits that follow. It lives in the
model folder (model_card.json + model_card.md); the JSON is part of the model id (cxr.models.store.weight_files),
so a model is never scored under another model's card. The score job reads its sources to warn about films
from a site the model never saw.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.common.manifest import NO_SOURCE, source_names
from cxr.models import store

CARD_JSON = store.CARD_FILE
CARD_MD = "model_card.md"
POPULATION_SPLITS = ("train", "val")    # what the model was fitted and tuned on
LOW_RECALL = 0.85


def _counts(values) -> dict[str, int]:
    s = pd.Series(values, dtype=object).fillna("unknown").astype(str)
    return {str(k): int(v) for k, v in s.value_counts().sort_index().items()}


def _size_range(frame: pd.DataFrame) -> dict[str, Any]:
    w = pd.to_numeric(frame["orig_width"], errors="coerce").dropna()
    h = pd.to_numeric(frame["orig_height"], errors="coerce").dropna()
    if not len(w):
        return {}
    return {"width": [int(w.min()), int(w.median()), int(w.max())],
            "height": [int(h.min()), int(h.median()), int(h.max())]}


def population(meta: pd.DataFrame, known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """{CLASS: {"images", "patients", "sources": {source: {images, patients, population, views, formats,
    original_size {width, height: [min, median, max]}}}}} from the image rows (label, source, patient_id,
    orig_width, orig_height, source_format, view_position where present)."""
    known = known or {}
    frame = meta[meta["label"].isin(list(CLASSES))].copy()
    frame["source"] = source_names(frame["source"] if "source" in frame else [None] * len(frame))
    out: dict[str, Any] = {}
    for c in CLASSES:
        part = frame[frame["label"] == c]
        sources = {}
        for source, rows in part.groupby("source", sort=True):
            facts = dict(known.get(source) or {})
            views = _counts(rows["view_position"]) if "view_position" in rows and rows["view_position"].notna().any() \
                else facts.get("views", "not recorded")
            sources[source] = {"images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
                               "population": facts.get("population", "not known"),
                               "site": facts.get("site", "not known"), "views": views,
                               "formats": _counts(rows["source_format"]), "original_size": _size_range(rows)}
        out[c] = {"images": int(len(part)), "patients": int(part["patient_id"].nunique()), "sources": sources}
    return out


def limits(card: Mapping[str, Any]) -> list[str]:
    """Plain statements of what the model has not learnt, from the population and the measured recalls."""
    notes = []
    for c, pop in card["population"].items():
        srcs = pop["sources"]
        if not srcs:
            notes.append(f"{c}: no training images: the model cannot recognise {c} films.")
            continue
        groups = sorted({s["population"] for s in srcs.values()})
        if len(srcs) == 1:
            (name, s), = srcs.items()
            notes.append(f"{c}: one source only ({name}; {s['population']}): the model has never seen {c} films of "
                         "another site or population, and its calls there are untested.")
        if groups and all(g != "not known" for g in groups) and len(groups) == 1:
            notes.append(f"{c}: {groups[0]} only.")
        if NO_SOURCE in srcs:
            notes.append(f"{c}: {srcs[NO_SOURCE]['images']} training images have no known source.")
    for r in card.get("by_source") or []:
        if r["recall"] < LOW_RECALL:
            notes.append(f"{r['class']} films from {r['source']}: recall {r['recall']:.2f} on the held-out "
                         f"{card.get('evaluated_on', 'test')} split ({r['n']} images).")
    for r in card.get("leave_one_source_out") or []:
        if r["recall"] < LOW_RECALL:
            notes.append(f"{r['class']} films from a site it never saw ({r['source']} left out of training): recall "
                         f"{r['recall']:.2f} ± {r['sd']:.2f} over {int(r['seeds'])} seeds.")
    notes.append("Findings outside the three classes (bacterial pneumonia, other opacities, devices only) are not "
                 "classes: such films still get one of the three calls.")
    return notes


def build(model_dir: str | Path, meta: pd.DataFrame, config: Mapping[str, Any]) -> dict[str, Any]:
    """The card of a trained model from its training rows (meta: the preprocess images table's thin columns of
    POPULATION_SPLITS)."""
    m = store.read_metadata(model_dir)
    card = {"schema": "cxr.model_card/1", "model": m.get("name"), "family": m.get("family"),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "trained_on": {"data": (m.get("data") or {}).get("dir"), "splits": list(POPULATION_SPLITS),
                           "manifest_sha256": (m.get("data") or {}).get("manifest_sha256")},
            "classes": list(CLASSES),
            "population": population(meta, config.get("sources")),
            "class_weight": ((m.get("training") or {}).get("class_weight") or {}).get("mode"),
            "site_augment": bool(((m.get("training") or {}).get("site_augment") or {}).get("enabled")),
            "source_adversary": bool(((m.get("training") or {}).get("source_adversary") or {}).get("enabled")),
            "framing": float(((m.get("training") or {}).get("framing") or {}).get("p") or 0.0),
            "by_source": [], "leave_one_source_out": []}
    card["sources"] = sorted({s for pop in card["population"].values() for s in pop["sources"]})
    card["limits"] = limits(card)
    return card


def with_evaluation(card: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], split: str) -> dict[str, Any]:
    """The card with its per-(source, class) recall on a held-out split (cxr.evaluate.by_source.cells rows)."""
    out = {**card, "by_source": [dict(r) for r in rows], "evaluated_on": split}
    out["limits"] = limits(out)
    return out


def with_crossval(card: Mapping[str, Any], crossvals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The card with cross-validations' per-source recall: leave-one-source-out runs (group_by source) as
    `leave_one_source_out`, patient-grouped ones as `crossval_by_source`."""
    out = dict(card)
    for result in crossvals:
        key = "leave_one_source_out" if result.get("group_by") == "source" else "crossval_by_source"
        out[key] = [{k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in r.items()}
                    for r in result.get("by_source") or []]
        if key == "crossval_by_source":
            out["crossval_summary"] = {name: {m: s[m] for m in ("macro_f1", "accuracy") if m in s}
                                       for name, s in (result.get("summary") or {}).items()}
    out["limits"] = limits(out)
    return out


def format_card(card: Mapping[str, Any]) -> str:
    """model_card.md."""
    lines = [f"# Model card: {card['model']}", "",
             f"- family {card['family']}; class weights {card.get('class_weight')}; site augmentation "
             f"{'on' if card.get('site_augment') else 'off'}; source adversary "
             f"{'on' if card.get('source_adversary') else 'off'}; framing augmentation "
             f"{'p ' + format(card['framing'], 'g') if card.get('framing') else 'off'}",
             f"- trained on `{card['trained_on']['data']}` ({', '.join(card['trained_on']['splits'])} splits)", "",
             "## Training population", "",
             "| class | source | images | patients | population | views | formats | original width (min/median/max) |",
             "|---|---|---|---|---|---|---|---|"]
    for c, pop in card["population"].items():
        if not pop["sources"]:
            lines.append(f"| {c} | (none) | 0 | 0 | | | | |")
        for s, d in pop["sources"].items():
            views = d["views"] if isinstance(d["views"], str) else ", ".join(f"{k} {v}" for k, v in d["views"].items())
            fmts = ", ".join(f"{k} {v}" for k, v in d["formats"].items())
            width = "/".join(str(v) for v in (d["original_size"] or {}).get("width", [])) or "n/a"
            lines.append(f"| {c} | {s} | {d['images']} | {d['patients']} | {d['population']} | {views} | {fmts} | "
                         f"{width} |")
    if card.get("by_source"):
        from cxr.evaluate.by_source import table

        lines += ["", f"## Per source and class ({card.get('evaluated_on', 'test')} split)", "",
                  table(card["by_source"])]
    for key, title in (("crossval_by_source", "Cross-validation (patient-grouped) per source and class"),
                       ("leave_one_source_out", "Leave one source out: recall on a source never trained on")):
        rows = card.get(key) or []
        if rows:
            lines += ["", f"## {title}", "", "| model | source | class | images | recall (mean ± sd over seeds) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['source']} | {r['class']} | {int(r['n'])} | {r['recall']:.3f} ± "
                      f"{r['sd']:.3f} |" for r in rows]
    lines += ["", "## Limits", ""] + [f"- {n}" for n in card["limits"]] + [
        "", "Research software, not a diagnostic device.", ""]
    return "\n".join(lines)


def write(model_dir: str | Path, card: Mapping[str, Any]) -> Path:
    d = Path(model_dir)
    (d / CARD_JSON).write_text(json.dumps(card, indent=1, sort_keys=True, default=str) + "\n")
    (d / CARD_MD).write_text(format_card(card))
    return d / CARD_MD


def read(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def training_rows(data_dir: str, splits: Sequence[str] = POPULATION_SPLITS) -> pd.DataFrame:
    """The thin columns a card needs, of the given splits (older tables lack source/view: null)."""
    from cxr.data.loader import images_dataset

    dataset = images_dataset(str(data_dir))
    names = set(dataset.schema.names)
    wanted = ["label", "split", "source", "patient_id", "sha256", "orig_width", "orig_height", "source_format",
              "view_position"]
    import pyarrow.dataset as ds

    frame = dataset.to_table(columns=[c for c in wanted if c in names],
                             filter=ds.field("split").isin(list(splits))).to_pandas()
    for c in wanted:
        if c not in frame:
            frame[c] = None
    return frame


def record_results(models_dir: str | Path, evaluation: Mapping[str, Any] | None = None,
                   crossval_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """Add an evaluation's per-(source, class) recall (cxr.spark.evaluate's `by_source`) and cross-validations'
    per-source results (their crossval.json) to the cards of models_dir's models (members are left alone).
    Returns the cards written."""
    crossvals = [json.loads((Path(d) / "crossval.json").read_text()) for d in crossval_dirs]
    written = []
    for name, summary in ((evaluation or {}).get("models") or {}).items():
        d = Path(models_dir) / name
        current = read(d)
        if current is None or summary.get("member_of"):
            continue
        current = with_evaluation(current, summary.get("by_source") or [], evaluation["split"])
        written.append(write(d, with_crossval(current, crossvals) if crossvals else current))
    if evaluation is None and crossvals:
        for d in sorted(p.parent for p in Path(models_dir).glob(f"*/{CARD_JSON}")):
            written.append(write(d, with_crossval(read(d), crossvals)))
    return written


def report_section(model_dirs: Sequence[str | Path]) -> str:
    """report.md's summary of each model's card: what it was trained on and its limits."""
    lines = ["## Model cards", "",
             "What each model learnt from and what it has not seen (the whole card: `<model>/model_card.md`; "
             "`model_card.json` is part of the model id).", ""]
    found = False
    for d in model_dirs:
        c = read(d)
        if c is None:
            continue
        found = True
        cells = ", ".join(f"{cls} " + " + ".join(f"{s} {v['images']}" for s, v in pop["sources"].items())
                          for cls, pop in c["population"].items() if pop["sources"])
        lines += [f"**{Path(d).name}** ([card]({Path(d).name}/{CARD_MD})): trained on {cells}.", ""]
        lines += [f"- {n}" for n in c["limits"]] + [""]
    return "\n".join(lines) + "\n" if found else ""
