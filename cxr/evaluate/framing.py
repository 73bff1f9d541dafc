"""The framing probe: does a model's call survive the same film framed as another archive frames it?

Why: in the shared folders every NIH NORMAL film is a 224 px square and most COVID films are landscape (aspect
~1.2), so with `pad` the shape of the bands the preprocessing adds tells the classes apart, and no fold of a
cross-validation over the same files can see it: every held-out film is framed as its source frames films. A
hospital's films have their own shapes. The probe cuts each held-out raw film at its centre to a few common
shapes (only cut, never padded: no pixel invented), runs the model's own preprocessing and the model on each,
and reports the recall of each (source, class) per shape beside the film as filed. A class whose recall falls
when only the frame changes is known by its frame. The same machinery asks the same of other changes a film
makes between archives and that say nothing about disease (PROBES): a black or white frame around it (scanned and
collimated films), the film coming at the NIH files' 224 px, or side and position markers burnt into it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from cxr import CLASSES
from cxr.image.enhance import centre_cut
from cxr.image.pipeline import PreprocessParams, preprocess_pixels

# a variant of the raw film: a width / height to cut it to, a function of the decoded film, or None (as filed)
Variant = Union[float, Callable[[np.ndarray], np.ndarray], None]

FRAMINGS: dict[str, Variant] = {"as filed": None, "portrait 0.82": 0.82, "square": 1.0, "landscape 1.22": 1.22}


def framed(film: np.ndarray, fraction: float, white: bool) -> np.ndarray:
    """The film with a band of `fraction` of each side set to black or to its type's white: the frame a scanned
    or collimated film carries."""
    out = film.copy()
    h, w = out.shape[:2]
    a, b = int(h * fraction), int(w * fraction)
    value = (np.iinfo(out.dtype).max if np.issubdtype(out.dtype, np.integer) else out.max()) if white else 0
    out[:a], out[h - a:], out[:, :b], out[:, w - b:] = value, value, value, value
    return out


def at_most(film: np.ndarray, side: int) -> np.ndarray:
    """The film shrunk (INTER_AREA) so its longer side is at most `side` px: how sharp a 224 px file is."""
    import cv2

    h, w = film.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return film
    return cv2.resize(film, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def marked(film: np.ndarray, text: str, corner: str, height: float = 0.035) -> np.ndarray:
    """The film with white text burnt in near a corner ("top left", "bottom right", ...), its letters `height` of
    the film's longer side tall: the side and position markers many archives write on their films."""
    import cv2

    out = np.ascontiguousarray(film.copy())
    h, w = out.shape[:2]
    scale = max(h, w) * height / 22.0   # FONT_HERSHEY_SIMPLEX capitals are ~22 px tall at scale 1
    thickness = max(1, int(round(scale * 2)))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = int(0.04 * w) if corner.endswith("left") else w - tw - int(0.04 * w)
    y = int(0.04 * h) + th if corner.startswith("top") else h - int(0.04 * h)
    white = int(np.iinfo(out.dtype).max) if np.issubdtype(out.dtype, np.integer) else float(out.max())
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, white, thickness, cv2.LINE_AA)
    return out


PROBES: dict[str, dict[str, Variant]] = {
    "framing": FRAMINGS,
    "frames": {"as filed": None, "black frame 4%": lambda f: framed(f, 0.04, False),
               "black frame 8%": lambda f: framed(f, 0.08, False), "white frame 8%": lambda f: framed(f, 0.08, True)},
    "resolution": {"as filed": None, "at most 224 px": lambda f: at_most(f, 224)},
    "markers": {"as filed": None, "R top left": lambda f: marked(f, "R", "top left", 0.05),
                "PORTABLE top left": lambda f: marked(f, "PORTABLE", "top left"),
                "AP SUPINE bottom right": lambda f: marked(f, "AP SUPINE", "bottom right")},
}


def _variant(film: np.ndarray, variant: Variant) -> np.ndarray:
    if variant is None:
        return film
    return variant(film) if callable(variant) else centre_cut(film, variant)


def framed_images(pixels: Sequence[np.ndarray], params: PreprocessParams,
                  framings: Mapping[str, Variant] = FRAMINGS) -> dict[str, np.ndarray]:
    """Decoded films (2-D, any dtype the decoder gives) -> {variant: (N, size, size) uint8 model inputs}."""
    return {name: np.stack([preprocess_pixels(_variant(p, variant), params) for p in pixels])
            for name, variant in framings.items()}


def recall_table(labels: Sequence[str], sources: Sequence[str], calls: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """calls: {framing: the predicted class of every film}. One row per (source, class, framing): films, recall,
    and the share called each class."""
    labels, sources = np.asarray(labels), np.asarray(sources)
    rows = []
    for (source, label), idx in pd.Series(range(len(labels))).groupby([sources, labels]).groups.items():
        idx = np.asarray(list(idx))
        for name, called in calls.items():
            got = np.asarray(called)[idx]
            rows.append({"source": source, "class": label, "framing": name, "films": len(idx),
                         "recall": float((got == label).mean()),
                         **{f"called {c}": float((got == c).mean()) for c in CLASSES}})
    return pd.DataFrame(rows)


def probe(predict, pixels: Sequence[np.ndarray], labels: Sequence[str], sources: Sequence[str],
          params: PreprocessParams, framings: Mapping[str, Variant] = FRAMINGS) -> pd.DataFrame:
    """predict: (N, size, size) uint8 -> (N, 3) probabilities (the model as it scores). The recall table."""
    calls = {name: np.asarray(CLASSES)[np.asarray(predict(x)).argmax(axis=1)]
             for name, x in framed_images(pixels, params, framings).items()}
    return recall_table(labels, sources, calls)


def markdown(tables: Mapping[str, pd.DataFrame]) -> str:
    """{model name: recall table} -> one markdown table: recall per (source, class, framing), a column per model."""
    from cxr.common.markdown import table

    names = list(tables)
    first = tables[names[0]]

    def cell(t, i):
        sd = t.loc[i, "recall_sd"] if "recall_sd" in t else None
        return f"{t.loc[i, 'recall']:.3f}" + ("" if sd is None or pd.isna(sd) else f" ± {sd:.3f}")

    rows = [[r["source"], r["class"], r["framing"], int(r["films"]), *(cell(tables[n], i) for n in names)]
            for i, r in first.iterrows()]
    return "\n".join(table(["source", "class", "framing", "films", *names], rows))


def crossval_probe(cv_dir: str | Path, pixels_of, predictor_of,
                   framings: Mapping[str, Variant] = FRAMINGS) -> pd.DataFrame:
    """The probe out of fold: each film framed every way and called by the model of the fold that held it out,
    for every seed of a jobs/crossval.py run kept with --keep-models (its folds.csv and models/seed*/fold*/).
    pixels_of(sha256s, params) -> decoded films; predictor_of(model_dir) -> a predict function as probe() takes.
    One row per (source, class, framing): films, recall's mean and sd over the seeds."""
    cv = Path(cv_dir)
    folds = pd.read_csv(cv / "folds.csv")
    films = folds.drop_duplicates("sha256").reset_index(drop=True)
    position = {sha: i for i, sha in enumerate(films["sha256"])}
    first = next((cv / "models").glob("seed*/fold*/*/metrics.json"), None)
    if first is None:
        raise FileNotFoundError(f"{cv}/models holds no fold models: run jobs/crossval.py with --keep-models")
    params = PreprocessParams.from_dict(json.loads(first.read_text())["preprocess"])
    framed = framed_images(pixels_of(list(films["sha256"]), params), params, framings)
    per_seed = []
    for seed, part in folds.groupby("seed"):
        calls = {name: np.empty(len(films), object) for name in framed}
        for fold, rows in part.groupby("fold"):
            (model_dir,) = [m.parent for m in (cv / "models" / f"seed{seed}" / f"fold{fold}").glob("*/metrics.json")]
            predict = predictor_of(model_dir)
            idx = np.array([position[s] for s in rows["sha256"]])
            for name, x in framed.items():
                calls[name][idx] = np.asarray(CLASSES)[np.asarray(predict(x[idx])).argmax(axis=1)]
        seen = np.array([position[s] for s in part["sha256"]])
        per_seed.append(recall_table(films["label"].to_numpy()[seen], films["source"].to_numpy()[seen],
                                     {n: c[seen] for n, c in calls.items()}).assign(seed=seed))
    both = pd.concat(per_seed, ignore_index=True)
    order = {n: i for i, n in enumerate(framed)}
    out = (both.groupby(["source", "class", "framing"], sort=False)
           .agg(films=("films", "first"), recall=("recall", "mean"), recall_sd=("recall", "std"),
                seeds=("seed", "nunique")).reset_index())
    return out.sort_values(["source", "class", "framing"], key=lambda c: c.map(order) if c.name == "framing" else c,
                           kind="stable").reset_index(drop=True)
