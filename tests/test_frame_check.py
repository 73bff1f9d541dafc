"""The frame check (cxr.image.frame): a film with a uniform black or white frame is flagged as unlike the training
films by the score job (issue 30: a black frame turns the shipped profile's adult normal calls to COVID)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr.evaluate.framing import framed
from cxr.image.frame import DEPTH, SIDES, framed_sides, margins
from cxr.scope.frontal import UNLIKE_TRAINING, verdicts
from tests.conftest import shared_data


def _film(h=400, w=320, seed=0):
    """Structure everywhere, never at the black or white end of the range (as a film's lungs and body)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(60 + 80 * np.sin(x / 17.0) * np.cos(y / 23.0) + rng.normal(0, 12, (h, w)), 20, 230).astype(np.uint8)


def test_margins_measure_a_frame_and_nothing_else():
    film = _film()
    assert margins(film) == (0.0, 0.0, 0.0, 0.0) and framed_sides(film) == 0
    for fraction in (0.08, 0.15):
        m = margins(framed(film, fraction, white=False))
        assert all(abs(v - fraction) <= 0.01 for v in m), m
    assert framed_sides(framed(film, 0.08, white=True)) == 4
    # black along two sides, white along the other two: each side is measured on its own
    mixed = film.copy()
    mixed[:32], mixed[-32:] = 0, 0
    mixed[:, :26], mixed[:, -26:] = 255, 255
    assert framed_sides(mixed) == 4
    # 16-bit films, colour films and tiny films
    assert framed_sides(framed(film.astype(np.uint16) * 257, 0.08, white=False)) == 4
    assert framed_sides(np.dstack([framed(film, 0.08, False)] * 3)) == 4
    assert margins(np.zeros((5, 5), np.uint8)) == (0.0, 0.0, 0.0, 0.0)
    # a band on one side only (a pad band, a marker strip) is not a frame
    one = film.copy()
    one[:40] = 0
    assert margins(one)[0] > DEPTH and framed_sides(one) == 1 < SIDES


def test_a_framed_film_is_unlike_the_training_films_in_the_verdicts():
    inside, reasons = verdicts(None, None, None, None, framed_sides=np.array([0, 2, 3, 4]))
    assert inside.tolist() == [True, True, False, False]
    assert reasons[0] is None and reasons[1] is None
    assert reasons[3].startswith(UNLIKE_TRAINING) and "uniform frame along 4 sides" in reasons[3]


def test_the_score_job_flags_a_framed_film_and_scores_it(spark, tmp_path):
    from cxr.config import load_config
    from cxr.spark.score import run
    from tests.scoring_models import tiny_keras_cnn

    films = sorted((shared_data("cxr-adult") / "NORMAL").glob("*.png"))[:3]
    root = tmp_path / "archive" / "NORMAL"
    root.mkdir(parents=True)
    for i, path in enumerate(films):
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(root / f"film{i}.png"), gray)
        cv2.imwrite(str(root / f"framed{i}.png"), framed(gray, 0.08, white=bool(i % 2)))
    params = {"size": 64, "resize_mode": "pad", "decode_reduction": "auto"}
    model = tiny_keras_cnn(tmp_path / "cnn", params, 64)
    config = load_config(overrides={**{f"preprocess.{k}": v for k, v in params.items()}, "score.batch_size": 8})
    record = run(spark, str(tmp_path / "archive"), str(model), str(tmp_path / "preds"), config)
    preds = pd.read_parquet(tmp_path / "preds" / "predictions")
    assert record["counts"]["scored"] == len(preds) == 6
    reason = preds["ood_reason"].fillna("")
    boxed = preds["path"].str.contains("framed")
    assert reason[boxed].str.contains("uniform frame along 4 sides").all()
    assert not preds.loc[boxed, "in_distribution"].any() and preds.loc[boxed, "p_normal"].notna().all()
    assert not reason[~boxed].str.contains("uniform frame").any()
    assert record["scope_reasons"]["unlike_training"] >= 3
    # scope.frame: false leaves the frames unmeasured
    off = load_config(overrides={**{f"preprocess.{k}": v for k, v in params.items()}, "score.batch_size": 8,
                                 "scope.frame": False})
    run(spark, str(tmp_path / "archive"), str(model), str(tmp_path / "preds-off"), off)
    unframed = pd.read_parquet(tmp_path / "preds-off" / "predictions")
    assert len(unframed) == 6 and not unframed["ood_reason"].fillna("").str.contains("uniform frame").any()
