"""cxr.evaluate.metrics against hand-computed matrices, published Wilson intervals and brute-force AUC."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from cxr.evaluate.metrics import (confusion_matrix, macro_f1, normal_vs_viral, per_class, roc_auc, roc_auc_ovr, roc_curve,
                         summarize, wilson_interval)

# 9 rows: truth 0,0,0 | 1,1 | 2,2,2,2 -> predictions chosen so every cell below is easy to check by hand
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
CM = np.array([[2, 1, 0],
               [0, 1, 1],
               [1, 0, 3]])


def test_confusion_matrix_rows_are_truth():
    assert confusion_matrix(Y_TRUE, Y_PRED).tolist() == CM.tolist()


def test_per_class_by_hand():
    m = per_class(CM)
    # COVID: tp 2, fn 1, fp 1, tn 5
    assert (m["COVID"]["tp"], m["COVID"]["fn"], m["COVID"]["fp"], m["COVID"]["tn"]) == (2, 1, 1, 5)
    assert m["COVID"]["sensitivity"] == pytest.approx(2 / 3)
    assert m["COVID"]["specificity"] == pytest.approx(5 / 6)
    assert m["COVID"]["precision"] == pytest.approx(2 / 3)
    assert m["COVID"]["f1"] == pytest.approx(2 / 3)
    # NORMAL: tp 1, fn 1, fp 1, tn 6
    assert m["NORMAL"]["specificity"] == pytest.approx(6 / 7)
    assert m["NORMAL"]["f1"] == pytest.approx(0.5)
    # VIRAL: tp 3, fn 1, fp 1, tn 4
    assert m["VIRAL"]["sensitivity"] == pytest.approx(0.75)
    assert m["VIRAL"]["specificity"] == pytest.approx(0.8)
    assert macro_f1(CM) == pytest.approx((2 / 3 + 0.5 + 0.75) / 3)


def test_undefined_precision_is_none_and_f1_zero():
    cm = np.array([[3, 0, 0], [2, 0, 0], [0, 0, 1]])  # NORMAL never predicted
    m = per_class(cm)
    assert m["NORMAL"]["precision"] is None
    assert m["NORMAL"]["f1"] == 0.0
    cm_absent = np.array([[3, 0, 0], [0, 0, 0], [0, 0, 1]])  # NORMAL neither present nor predicted
    assert per_class(cm_absent)["NORMAL"]["f1"] is None
    assert macro_f1(cm_absent) == pytest.approx(1.0)


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775),   # Wilson 95% for 0/10 (Newcombe 1998, table I style values)
    (8, 10, 0.4902, 0.9433),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_reference_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4)
    assert got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_empty():
    assert wilson_interval(0, 0) == (None, None)


def _brute_auc(pos, scores):
    p, n = scores[pos], scores[~pos]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(p, n))
    return wins / (len(p) * len(n))


def test_auc_small_examples():
    assert roc_auc(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.4, 0.5, 0.1])) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 0], bool), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1], bool), np.array([0.5, 0.2])) is None


def test_auc_equals_brute_force_with_ties_and_trapezoid_of_curve():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        pos = rng.random(n) < 0.4
        if pos.all() or not pos.any():
            continue
        scores = np.round(rng.random(n), 1)  # many ties
        auc = roc_auc(pos, scores)
        assert auc == pytest.approx(_brute_auc(pos, scores))
        fpr, tpr = roc_curve(pos, scores)
        assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
        assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_ovr_and_normal_vs_viral():
    proba = np.array([
        [0.8, 0.1, 0.1],   # COVID, right
        [0.1, 0.6, 0.3],   # NORMAL, right
        [0.5, 0.2, 0.3],   # NORMAL: argmax COVID, but NORMAL < VIRAL -> called VIRAL within the pair
        [0.2, 0.1, 0.7],   # VIRAL, right
        [0.6, 0.3, 0.1],   # VIRAL: argmax COVID, NORMAL > VIRAL -> called NORMAL within the pair
    ])
    y = np.array([0, 1, 1, 2, 2])
    nv = normal_vs_viral(y, proba)
    assert nv["n"] == 4
    assert nv["confusion"] == [[1, 1], [1, 1]]
    assert nv["accuracy"] == pytest.approx(0.5)
    assert nv["also_called_covid"] == 2
    ovr = roc_auc_ovr(y, proba)
    assert ovr["per_class"]["COVID"] == pytest.approx(_brute_auc(y == 0, proba[:, 0]))
    assert ovr["macro"] == pytest.approx(np.mean(list(ovr["per_class"].values())))
    s = summarize(y, proba)
    assert s["n"] == 5 and s["accuracy"] == pytest.approx(3 / 5)
    assert s["confusion"] == confusion_matrix(y, proba.argmax(1)).tolist()
