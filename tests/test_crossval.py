"""Grouped k-fold cross-validation (cxr.evaluate.folds, cxr.evaluate.crossval, jobs/crossval.py on local[2]) and the shortcut
probes (cxr.evaluate.probes)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr import CLASSES
from cxr.evaluate.folds import assign_folds, check_grouping, group_keys
from cxr.evaluate.probes import mask_images, metadata_probe, region_mask, region_scores, verdict
from tests.train_data import pre_out, train_config  # noqa: F401 (fixtures)


def _patients(n_patients: int, seed: int = 0):
    """Patients of 1-3 images each, one class per patient, classes unbalanced 2:1:1."""
    rng = np.random.default_rng(seed)
    y, groups = [], []
    for p in range(n_patients):
        label = [0, 0, 1, 2][p % 4]
        for _ in range(int(rng.integers(1, 4))):
            y.append(label)
            groups.append(f"P{p}")
    return np.asarray(y), np.asarray(groups, dtype=object)


def test_folds_keep_every_patient_in_one_fold_and_balance_classes():
    y, groups = _patients(120)
    folds = assign_folds(y, groups, 5, seed=42)
    check_grouping(folds, groups)  # raises if a patient spans two folds
    assert set(folds) == set(range(5))
    overall = np.bincount(y, minlength=3) / len(y)
    for f in range(5):
        share = np.bincount(y[folds == f], minlength=3) / (folds == f).sum()
        assert np.abs(share - overall).max() < 0.1, (f, share, overall)
    assert (assign_folds(y, groups, 5, seed=42) == folds).all()          # a seed fixes the assignment
    assert (assign_folds(y, groups, 5, seed=43) != folds).any()          # another seed gives another


def test_train_subsample_keeps_whole_patients_and_a_fraction_of_each_class():
    from cxr.evaluate.crossval import train_subsample

    y, groups = _patients(200)
    keep = train_subsample(y, groups, 0.5, seed=42, fold=1)
    kept = pd.DataFrame({"g": groups, "k": keep, "y": y})
    assert (kept.groupby("g")["k"].nunique() == 1).all()                     # a patient is kept whole
    per_class = kept.drop_duplicates("g").groupby("y")["k"].mean()
    assert np.allclose(per_class, 0.5, atol=0.02)
    assert np.array_equal(keep, train_subsample(y, groups, 0.5, seed=42, fold=1))      # seeded
    assert not np.array_equal(keep, train_subsample(y, groups, 0.5, seed=42, fold=2))
    assert train_subsample(y, groups, 1.0, seed=42, fold=1).all()
    with pytest.raises(ValueError):
        train_subsample(y, groups, 0.0, seed=42, fold=1)


def test_check_grouping_catches_a_patient_in_two_folds():
    with pytest.raises(AssertionError, match="span several folds"):
        check_grouping(np.array([0, 1, 1]), np.array(["a", "a", "b"], dtype=object))


def test_group_keys_fall_back_to_the_content_hash():
    keys = group_keys([None, "P1", "", "P1"], ["s0", "s1", "s2", "s3"])
    assert list(keys) == ["sha:s0", "patient:P1", "sha:s2", "patient:P1"]


def test_too_few_groups_for_the_folds_is_refused():
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        assign_folds(np.array([0, 1, 2, 0]), np.array(["a", "b", "c", "d"], dtype=object), 5, seed=0)


def test_masks_keep_one_region_and_blank_the_other_to_its_mean():
    rng = np.random.default_rng(0)
    x = rng.random((3, 40, 40, 1)).astype(np.float32)
    band = region_mask((40, 40), 0.15)
    assert band[:6].all() and band[:, :6].all() and not band[6:34, 6:34].any()   # 15% of 40 = 6 px
    border = mask_images(x, "border_only")
    np.testing.assert_array_equal(border[:, band], x[:, band])
    for i in range(3):
        np.testing.assert_allclose(border[i, ~band], x[i, band].mean(), rtol=1e-5)
    lungs = mask_images(x, "lungs_only")
    np.testing.assert_array_equal(lungs[:, ~band], x[:, ~band])
    np.testing.assert_allclose(lungs[0, band], x[0, ~band].mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        mask_images(x, "everything")


def _meta(n: int, planted: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.asarray(CLASSES)[rng.integers(0, 3, n)]
    if planted:   # each source has its own detector size and file format, as in public COVID sets
        width = np.select([labels == "COVID", labels == "NORMAL"], [1024, 2000], 1500) + rng.integers(-20, 20, n)
        fmt = np.where(labels == "COVID", "png", "jpeg")
    else:
        width = rng.integers(1000, 2000, n)
        fmt = rng.choice(["png", "jpeg"], n)
    return pd.DataFrame({"label": labels, "orig_width": width, "orig_height": rng.integers(1000, 2000, n),
                         "source_format": fmt, "color_mode": "gray"})


def test_metadata_probe_finds_a_planted_source_shortcut_and_not_a_missing_one():
    planted = metadata_probe(_meta(300, True), _meta(150, True, seed=1))
    assert planted["accuracy"] > 0.95 and planted["normal_vs_viral"] > 0.95
    honest = metadata_probe(_meta(300, False), _meta(300, False, seed=1))
    assert honest["accuracy"] < 0.5
    cnn = {"full": {"accuracy": 0.9, "normal_vs_viral": 0.9}}
    assert any("metadata alone" in w for w in verdict(cnn, planted))
    assert not verdict(cnn, honest)


def test_region_probe_exposes_a_model_that_reads_the_border():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    x = rng.random((90, 32, 32, 1)).astype(np.float32) * 0.2
    band = region_mask((32, 32))
    x[:, band, 0] += (0.3 * y)[:, None]          # the class is written in the border only (a "source tag")

    def border_reader(images):
        level = images[:, band, 0].mean(axis=1) - 0.1
        return np.eye(3)[np.clip(np.round(level / 0.3), 0, 2).astype(int)]

    scores = region_scores(border_reader, x, y)
    assert scores["full"]["accuracy"] == 1.0 and scores["border_only"]["accuracy"] == 1.0
    assert scores["lungs_only"]["accuracy"] < 0.6
    assert any("lung field blanked" in w for w in verdict(scores, None))


@pytest.mark.slow
def test_crossval_on_local_spark(spark, pre_out, train_config, tmp_path):
    """Folds grouped by patient, every image held out once per seed, the executors' numbers equal to the kept
    fold models run on the driver, the report written, no silent overwrite."""
    from cxr.evaluate.crossval import run
    from cxr.data.loader import load_split
    from cxr.evaluate.metrics import summarize
    from cxr.models.store import load_predictor
    from cxr.train import OutputExistsError

    out = tmp_path / "cv"
    config = {**train_config, "crossval": {**train_config["crossval"], "keep_models": True}}
    result = run(spark, str(pre_out), str(out), config, folds=3, seeds=2, epochs=1, models="cnn,scratch-dnn")
    data = load_split(str(pre_out), ("train", "val", "test"))
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 2 * len(data) and set(folds["seed"]) == {42, 43}
    for seed, part in folds.groupby("seed"):
        assert sorted(part["sha256"]) == sorted(data.sha256)                 # every image held out once
        assert (part.groupby("group")["fold"].nunique() == 1).all()          # no patient in two folds
        assert part["group"].str.startswith("patient:").all()
    assert set(result["summary"]) == {"cnn-adam", "scratch-dnn"}
    assert all(s["runs"] == 6 for s in result["summary"].values())
    assert {"metadata-only/full", "cnn-adam/border_only", "scratch-dnn/lungs_only"} <= set(result["probes"])
    # one held-out fold recomputed on the driver with the kept models: the same numbers
    seed, fold = 43, 1
    held = set(folds.loc[(folds["seed"] == seed) & (folds["fold"] == fold), "sha256"])
    rows = np.isin(data.sha256, list(held))
    for name in ("cnn-adam", "scratch-dnn"):
        model = out / "models" / f"seed{seed}" / f"fold{fold}" / name
        meta = json.loads((model / "metrics.json").read_text())
        assert meta["data"]["crossval"]["train_images"] == len(data) - rows.sum()
        want = summarize(data.y[rows], load_predictor(model).predict_proba(data.x[rows]))
        got = next(r for r in result["runs"] if (r["seed"], r["fold"], r["model"]) == (seed, fold, name))
        assert got["n"] == rows.sum() and got["accuracy"] == pytest.approx(want["accuracy"])
        assert got["macro_f1"] == pytest.approx(want["macro_f1"])
    report = (out / "crossval.md").read_text()
    assert "| cnn-adam |" in report and "± " in report and "## Shortcut probes" in report
    assert json.loads((out / "crossval.json").read_text())["folds"] == 3
    with pytest.raises(OutputExistsError):
        run(spark, str(pre_out), str(out), config, folds=3, seeds=1, epochs=1)


@pytest.mark.slow
def test_crossval_members_give_single_and_ensembles_on_the_same_folds(spark, pre_out, train_config, tmp_path):
    """crossval.members: an ensemble of 2 and each member evaluated on the same folds; the mean of the members'
    saved probabilities scores what the ensemble model scored (so smaller ensembles need no retraining), and
    per_seed holds each seed's CV mean and their spread; train_fraction trains on half of each fold's patients."""
    from cxr.evaluate.crossval import PREDICTIONS_FILE, ensemble_of_members, run

    config = {**train_config, "train": {**train_config["train"], "ensemble": 2},
              "crossval": {**train_config["crossval"], "train_fraction": 0.5, "keep_models": True}}
    out = tmp_path / "cv"
    result = run(spark, str(pre_out), str(out), config, folds=2, seeds=2, epochs=1, models="cnn", probes=False,
                 members=True)
    record = json.loads((out / "models" / "seed42" / "fold0" / "cnn-adam" / "metrics.json").read_text())
    folds = pd.read_csv(out / "folds.csv")
    trainable = int(((folds["seed"] == 42) & (folds["fold"] != 0)).sum())
    assert result["train_fraction"] == 0.5                 # a learning curve's point: half the patients
    assert abs(record["data"]["crossval"]["train_images"] - trainable / 2) <= 4
    names = {"cnn-adam", "cnn-adam:member0", "cnn-adam:member1"}
    assert set(result["summary"]) == names and all(result["summary"][n]["runs"] == 4 for n in names)
    assert result["members_evaluated"] and result["train"]["ensemble"] == 2
    predictions = pd.read_csv(out / PREDICTIONS_FILE)
    assert set(predictions["model"]) == names and len(predictions) == 3 * 2 * result["data"]["images"]
    runs = pd.DataFrame(result["runs"]).set_index(["model", "seed", "fold"]).sort_index()
    for k, model in ((2, "cnn-adam"), (1, "cnn-adam:member0")):
        again = ensemble_of_members(predictions, "cnn-adam", k).set_index(["seed", "fold"]).sort_index()
        assert np.allclose(again["accuracy"], runs.loc[model, "accuracy"])
        assert np.allclose(again["macro_f1"], runs.loc[model, "macro_f1"], atol=1e-6)
    seeds = result["per_seed"]["cnn-adam"]
    means = runs.loc["cnn-adam"].groupby("seed")["macro_f1"].mean()
    assert seeds["seeds"] == 2 and seeds["macro_f1"]["mean"] == pytest.approx(means.mean())
    assert seeds["macro_f1"]["sd"] == pytest.approx(means.std(ddof=1))
    assert "## Across seeds" in (out / "crossval.md").read_text()


def test_paired_calls_a_change_only_when_the_paired_folds_agree():
    from cxr.evaluate.crossval import paired

    base = [{"seed": 0, "fold": f, "macro_f1": v} for f, v in enumerate([0.90, 0.80, 0.95, 0.85, 0.70])]
    shifted = [{**r, "macro_f1": r["macro_f1"] + 0.03 + 0.002 * r["fold"]} for r in base]   # always better
    noisy = [{**r, "macro_f1": r["macro_f1"] + d} for r, d in zip(base, [0.05, -0.06, 0.04, -0.05, 0.03])]
    assert paired(base, shifted)["call"] == "helped"
    assert paired(shifted, base)["call"] == "hurt"
    assert paired(base, noisy)["call"] == "no clear difference"
    # folds of very different difficulty do not hide a consistent gain: the comparison is per fold
    assert abs(paired(base, shifted)["mean"] - 0.034) < 1e-9


def _fake_cv(root, seeds, shift: float = 0.0, folds_seed: int = 0):
    """A crossval output folder holding only what scripts/cv_compare.py reads: runs and folds.csv."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(folds_seed)
    runs = [{"seed": s, "fold": f, "model": "cnn-adam", "macro_f1": 0.9 + 0.01 * f + shift,
             "normal_vs_viral": 0.9 + shift, "accuracy": 0.9, "ece": 0.05} for s in seeds for f in range(3)]
    (root / "crossval.json").write_text(json.dumps({"models": ["cnn-adam"], "runs": runs}))
    pd.DataFrame([{"seed": s, "sha256": f"{i:04d}", "fold": int(rng.integers(3))} for s in seeds for i in range(12)]
                 ).to_csv(root / "folds.csv", index=False)
    return root


def _load_script(name: str):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cv_compare_joins_seed_chunks_and_refuses_other_folds(tmp_path):
    cv_compare = _load_script("cv_compare")
    base = _fake_cv(tmp_path / "base", [42, 43, 44])
    chunk_a = _fake_cv(tmp_path / "a", [42, 43], shift=0.02)
    chunk_b = _fake_cv(tmp_path / "b", [44], shift=0.02)
    # folds.csv of one seed depends on the seed only: the chunks repeat the base's assignment
    for d in (chunk_a, chunk_b):
        folds = pd.read_csv(base / "folds.csv")
        folds[folds["seed"].isin(pd.read_csv(d / "folds.csv")["seed"])].to_csv(d / "folds.csv", index=False)
    label, runs = cv_compare.parse_row(f"new={chunk_a}+{chunk_b}:cnn-adam")
    assert (label, runs) == ("new", [([chunk_a, chunk_b], "cnn-adam")])
    dirs = runs[0][0]
    cv_compare.check_same_folds([[base], dirs])
    rows = cv_compare.compare([("base", cv_compare.load_runs([([base], None)])[0]),
                               ("new", cv_compare.load_runs(runs)[0])])
    assert rows[1]["n"] == "3 x 3" and rows[1]["across_seeds"]["seeds"] == 3
    assert rows[1]["paired"]["macro_f1"]["mean"] == pytest.approx(0.02)
    assert "| new | 3 x 3 |" in cv_compare.table(rows)
    other = _fake_cv(tmp_path / "other", [42], folds_seed=1)
    with pytest.raises(SystemExit):
        cv_compare.check_same_folds([[base], [other]])


def test_cv_compare_mixed_row_scores_the_mean_of_two_runs_probabilities(tmp_path):
    """A&B: each run misses one image its partner is sure of; their mean gets all six right. An image only one
    run has is left out of the mix."""
    cv_compare = _load_script("cv_compare")
    right = {0: [0.6, 0.2, 0.2], 1: [0.2, 0.6, 0.2], 2: [0.2, 0.2, 0.6]}
    a_calls = {"c1": [0.2, 0.1, 0.7], "x": [0.0, 0.0, 1.0]}      # A misses c1 (and alone has x, a COVID film)
    b_calls = {"c1": [0.9, 0.05, 0.05], "n1": [0.1, 0.4, 0.5]}   # B is sure of c1 and just misses n1
    images = {"c0": 0, "c1": 0, "n0": 1, "n1": 1, "v0": 2, "v1": 2}
    for name, calls, extra in (("a", a_calls, {"x": 0}), ("b", b_calls, {})):
        d = tmp_path / name
        d.mkdir()
        rows = [{"seed": 42, "fold": 0, "model": "cnn-adam", "sha256": sha, "y": y,
                 **dict(zip(["p_COVID", "p_NORMAL", "p_VIRAL"], calls.get(sha, right[y])))}
                for sha, y in {**images, **extra}.items()]
        pd.DataFrame(rows).to_csv(d / "predictions.csv.gz", index=False)
    one = {name: cv_compare.metrics_of_mean(cv_compare.held_out([tmp_path / name], "cnn-adam"), name)
           for name in ("a", "b")}
    assert one["a"]["accuracy"].iloc[0] == pytest.approx(5 / 7) and one["b"]["accuracy"].iloc[0] == pytest.approx(5 / 6)
    label, runs = cv_compare.parse_row(f"mix={tmp_path / 'a'}:cnn-adam&{tmp_path / 'b'}:cnn-adam")
    mixed, name = cv_compare.load_runs(runs)
    assert label == "mix" and name == "cnn-adam & cnn-adam"
    assert mixed["n"].iloc[0] == 6 and mixed["accuracy"].iloc[0] == 1.0
    assert cv_compare.confusion(runs).trace() == 6


def test_cv_compare_pairs_each_source_and_class_cell_by_seed(tmp_path):
    """Two runs on the same folds: per (source, class) recall per seed, and the second's paired difference, as a
    hand count of the held-out calls gives them."""
    cv_compare = _load_script("cv_compare")
    images = [("a0", 0, "site-a"), ("a1", 0, "site-a"), ("b0", 0, "site-b"), ("n0", 1, "site-b")]
    wrong = {"base": {(42, "a1"), (43, "a0"), (43, "a1")}, "new": {(42, "a1"), (42, "b0")}}
    for name in ("base", "new"):
        d = tmp_path / name
        d.mkdir()
        rows, folds = [], []
        for seed in (42, 43):
            for sha, y, source in images:
                p = [0.1, 0.1, 0.1]
                p[(y + 1) % 3 if (seed, sha) in wrong[name] else y] = 0.8
                rows.append({"seed": seed, "fold": 0, "model": "cnn-adam", "sha256": sha, "y": y,
                             **dict(zip(["p_COVID", "p_NORMAL", "p_VIRAL"], p))})
                folds.append({"seed": seed, "sha256": sha, "fold": 0, "source": source})
        pd.DataFrame(rows).to_csv(d / "predictions.csv.gz", index=False)
        pd.DataFrame(folds).to_csv(d / "folds.csv", index=False)
    base = cv_compare.source_recalls([([tmp_path / "base"], "cnn-adam")])
    assert base.loc[("site-a", "COVID")].tolist() == [0.5, 0.0] and base.loc[("site-b", "COVID")].tolist() == [1, 1]
    text = cv_compare.source_table([("base", [([tmp_path / "base"], "cnn-adam")]),
                                    ("new", [([tmp_path / "new"], "cnn-adam")])])
    # site-a COVID: base 0.5, 0.0; new 0.5, 1.0 -> +0.0, +1.0; site-b COVID: base 1, 1; new 0, 1 -> -1.0, +0.0
    assert "| site-a | COVID | 0.250 ± 0.354 | 0.750 ± 0.354 | +0.500; +0.000, +1.000 |" in text
    assert "| site-b | COVID | 1.000 ± 0.000 | 0.500 ± 0.707 | -0.500; -1.000, +0.000 |" in text
    assert "| site-b | NORMAL |" in text


def test_cv_tta_shifts_move_the_image_and_fill_the_edge():
    cv_tta = _load_script("cv_tta")
    x = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7, 1)
    down_left = cv_tta.shifted(x, 2, -1)
    assert down_left.shape == x.shape
    assert np.array_equal(down_left[:, 2:, :-1], x[:, :-2, 1:])         # content moved 2 down, 1 left
    assert np.array_equal(down_left[:, 0, :-1], x[:, 0, 1:])            # the uncovered top row repeats the edge
    assert np.array_equal(cv_tta.shifted(x, 0, 0), x)
    assert cv_tta.plus_shifts(3) == [(0, 0), (3, 0), (-3, 0), (0, 3), (0, -3)]
