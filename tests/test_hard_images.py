"""cxr.evaluate.hard_images and scripts/cv_hard_images.py: per-image error rates over many held-out predictions
and the ceiling they set, checked against a confusion matrix worked out by hand."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxr.evaluate.hard_images import PROBA, ceiling, error_rates
from tests.conftest import ROOT

# 6 images, 2 per class; 3 models. "c1" (COVID) is called VIRAL by every model, "n1" (NORMAL) by one of three.
CALLS = {"c0": (0, [0, 0, 0]), "c1": (0, [2, 2, 2]), "n0": (1, [1, 1, 1]), "n1": (1, [1, 2, 1]),
         "v0": (2, [2, 2, 2]), "v1": (2, [2, 2, 2])}


def predictions() -> pd.DataFrame:
    rows = []
    for sha, (y, calls) in CALLS.items():
        for m, c in enumerate(calls):
            p = np.full(3, 0.1)
            p[c] = 0.8
            rows.append({"seed": 42, "fold": 0, "model": f"m{m}", "sha256": sha, "y": y,
                         **dict(zip(PROBA, p))})
    return pd.DataFrame(rows)


def test_error_rates_count_every_prediction_of_an_image():
    rates = error_rates(predictions()).set_index("sha256")
    assert rates.loc["c1", "error_rate"] == 1.0 and rates.loc["c1", "most_predicted"] == 2
    assert rates.loc["n1", "error_rate"] == pytest.approx(1 / 3) and rates.loc["n1", "most_predicted"] == 1
    assert (rates["n"] == 3).all() and rates.loc["c0", "error_rate"] == 0.0
    assert rates.loc["n1", "p_VIRAL"] == pytest.approx((0.1 + 0.8 + 0.1) / 3)


def test_ceiling_keeps_only_the_hard_images_wrong():
    rates = error_rates(predictions())
    c = ceiling(rates, 0.5)                      # only c1 stays wrong (called VIRAL)
    assert c["images"] == 1
    f1_covid, f1_normal, f1_viral = 2 * 1 * 0.5 / 1.5, 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert c["macro_f1"] == pytest.approx((f1_covid + f1_normal + f1_viral) / 3)
    assert c["normal_vs_viral"] == 1.0           # c1 is not a NORMAL or VIRAL image
    c = ceiling(rates, 0.3)                      # n1 joins, but its mean probabilities still lead with NORMAL
    assert c["images"] == 2 and c["normal_vs_viral"] == 1.0
    assert ceiling(rates, 1.0)["macro_f1"] == 1.0


def test_two_labels_for_one_image_are_refused():
    p = predictions()
    p.loc[0, "y"] = 1
    with pytest.raises(ValueError, match="two labels"):
        error_rates(p)


def test_script_lists_the_hard_image_with_its_manifest_name(tmp_path):
    cv = tmp_path / "cv"
    cv.mkdir()
    predictions().to_csv(cv / "predictions.csv.gz", index=False)
    pd.DataFrame({"sha256": ["c1"], "relative_path": ["COVID/odd.jpeg"]}).to_csv(tmp_path / "m.csv", index=False)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cv_hard_images.py"), str(cv),
                          "--manifest", str(tmp_path / "m.csv")], capture_output=True, text=True, check=True).stdout
    assert "| COVID/odd.jpeg | COVID | 100% | VIRAL | 3 |" in out
    assert "n1" not in out.split("Images wrong")[1]       # wrong once in three: not listed above 50%
