"""The out-of-distribution score (cxr.scope.ood): model.onnx's "features" equal the model's own layer features
(pooled conv blocks, hidden activations, the penultimate last), its "ood_distance" equals the NumPy sum of per-layer
Mahalanobis distances, training fits the Ledoit-Wolf references and the out-of-fold + val threshold for single,
scratch and ensemble models, shifted images lie farther, and ood.npz is part of the model id."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cxr.data.loader import load_split
from cxr.models import store
from cxr.models.onnx_export import add_distance_to_onnx, export_onnx, keep_outputs
from cxr.scope import ood, reference
from cxr.score.frames import model_id
from tests.train_data import SIZE, pre_out, train_config  # noqa: F401 (fixtures)

FEATURES_ATOL = 1e-4
DISTANCE_RTOL = 1e-4
KINDS = ("cnn-adam", "scratch-dnn", "ensemble")


@pytest.fixture(scope="module")
def models(pre_out, train_config, tmp_path_factory):
    """A Keras CNN and a scratch DNN, 1 epoch each, and a 2-member CNN ensemble, trained as jobs/train.py does."""
    from cxr.train import run

    out = tmp_path_factory.mktemp("ood_models")
    conf = json.loads(json.dumps(train_config))
    conf["scope"] = {**(conf.get("scope") or {}), "ood_quantile": 0.99}
    run(str(pre_out), str(out / "single"), conf, models="cnn,scratch-dnn", optimizers="adam", epochs=1)
    conf["train"]["ensemble"] = 2
    run(str(pre_out), str(out / "k2"), conf, models="cnn", optimizers="adam", epochs=1)
    return {"cnn-adam": out / "single" / "cnn-adam", "scratch-dnn": out / "single" / "scratch-dnn",
            "ensemble": out / "k2" / "cnn-adam"}


@pytest.fixture(scope="module")
def splits(pre_out):
    return {s: load_split(str(pre_out), s).x for s in ("train", "val", "test")}


def _own_features(d, x):
    """features_of on the model's own framework objects: the Keras model / cxr.nn network (members' concatenated),
    on x resized as the predictor would (scratch models may train on a smaller or larger copy)."""
    own = [store.load_predictor(m) for m in store.ensemble_members(d) or [d]]
    return np.concatenate([store.features_of(p.model, p._resize(x)) for p in own], axis=1)


def _same_precision(a, b) -> bool:
    """L L^T (the precision matrix) of every layer agrees: L itself is defined up to the signs of the
    eigenvectors."""
    if a.layers != b.layers or not np.array_equal(a.groups, b.groups):
        return False
    for fa, fb in zip(a.factors, b.factors):
        pa, pb = fa @ fa.T, fb @ fb.T
        if not np.allclose(pa, pb, rtol=1e-4, atol=1e-5 * np.abs(pb).max()):
            return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_features_and_distance_equal_the_framework(models, splits, kind):
    d = models[kind]
    x = np.concatenate([splits["val"], splits["test"]])
    graph = store.load_predictor(d, engine="onnx")   # ONNX Runtime (a scratch model's resize outside the graph)
    assert graph.output_names == ["proba", "features", "ood_distance"]
    proba, feats, dist = graph.run_outputs(x, graph.output_names)
    own = store.load_predictor(d)   # engine keras: Keras / cxr.nn
    want_f = _own_features(d, x)
    # train.keras.cnn filters [8, 16] + dense 32 (3 layers), scratch dnn hidden 32 (1 layer); 2 CNN members
    layers = {"cnn-adam": [[8, 16, 32]], "scratch-dnn": [[32]], "ensemble": [[8, 16, 32], [8, 16, 32]]}[kind]
    dims = sum(map(sum, layers))
    assert graph.feature_layers == layers
    assert feats.shape == want_f.shape == (len(x), dims) and dist.shape == (len(x),) and dist.dtype == np.float32
    assert np.max(np.abs(feats - want_f)) <= FEATURES_ATOL
    assert np.max(np.abs(feats - own.features(x))) <= FEATURES_ATOL
    assert np.ptp(want_f, axis=0).max() > 1e-3                           # features depend on the image
    assert np.max(np.abs(proba - own.predict_proba(x))) <= 1e-5          # probabilities as before
    ref = reference.load_reference(d)
    assert ref.dims == dims and ref.layers == len(layers[0])
    assert np.array_equal(ref.groups, reference.layer_groups(layers, dims))
    assert reference.relative_error(dist, reference.distances(want_f, ref)) <= DISTANCE_RTOL   # end to end
    assert reference.relative_error(dist, reference.distances(feats, ref)) <= DISTANCE_RTOL    # the distance nodes alone
    for engine in ("onnx", "keras"):
        p = store.load_predictor(d, engine=engine, batch_size=7)
        got_p, got_d = p.predict_scored(x)
        assert got_p.dtype == np.float32 and got_d.dtype == np.float32 and got_d.shape == (len(x),)
        assert np.max(np.abs(got_p - p.predict_proba(x))) <= 1e-6
        assert reference.relative_error(got_d, dist) <= DISTANCE_RTOL, engine
        assert p.ood_threshold == pytest.approx(ref.threshold)


@pytest.mark.parametrize("kind", KINDS)
def test_training_fits_the_reference_on_train_and_thresholds_on_val(models, splits, kind):
    d = models[kind]
    meta = store.read_metadata(d)
    rec = meta["ood"]
    assert rec["method"] == reference.METHOD
    assert rec["n_train"] == meta["data"]["train"]["images"] == len(splits["train"])
    assert rec["n_val"] == meta["data"]["val"]["images"] == len(splits["val"])
    assert rec["quantile"] == 0.99 and rec["threshold_on"] == "out-of-fold train (k=5) + val"
    assert rec["folds"] == 5 and rec["n_calibration"] == rec["n_train"] + rec["n_val"]
    assert len(rec["layers"]) == (1 if kind == "scratch-dnn" else 3)
    assert all(0 <= r["shrinkage"] <= 1 and r["scale"] > 0 for r in rec["layers"])
    assert sum(r["dims"] for r in rec["layers"]) == rec["dims"]
    assert rec["onnx_max_rel_diff"] <= DISTANCE_RTOL and rec["checked_with"] == "val split"
    assert meta["timings_s"]["ood"] > 0 and store.OOD_FILE in meta["files"]
    onnx_p = store.load_predictor(d, engine="onnx")
    ref = reference.load_reference(d)
    train_f = onnx_p.features(splits["train"])
    groups = reference.layer_groups(onnx_p.feature_layers, train_f.shape[1])
    direct = reference.fit_reference(train_f, onnx_p.features(splits["val"]), 0.99, groups=groups)
    assert np.allclose(direct.mean, ref.mean, atol=1e-5) and _same_precision(direct, ref)
    assert np.allclose(direct.scales, ref.scales, rtol=1e-4)
    assert rec["threshold"] == pytest.approx(direct.threshold, rel=1e-4)
    _, val_d = onnx_p.predict_scored(splits["val"])   # the val scores are among the calibration scores
    assert np.abs(ref.calibration[:, None] - val_d[None, :]).min(axis=0).max() <= 1e-3 * max(1, val_d.max())
    assert rec["threshold"] == pytest.approx(np.quantile(ref.calibration, 0.99), rel=1e-9)
    if kind == "ensemble":
        assert all(not (m / store.OOD_FILE).exists() for m in store.ensemble_members(d))  # one reference, on top
        import onnx

        graph = onnx.load(str(d / store.ONNX_FILE)).graph
        assert graph.node[-1].op_type == "Mean"


@pytest.mark.parametrize("n", [300, 12])  # more images than dimensions, and fewer (shrinkage keeps it invertible)
def test_layered_ledoit_wolf_mahalanobis_equals_a_direct_computation(n):
    """Two layers (features 0-11 and 12-19, interleaved on purpose): each layer's distance from its own Ledoit-Wolf
    covariance, divided by its median out-of-fold distance (5 folds), summed; threshold at the quantile of the
    out-of-fold train scores pooled with the val scores."""
    from sklearn.covariance import LedoitWolf
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(n)
    dims = 20
    mix = rng.normal(size=(dims, dims)) * np.linspace(0.1, 3, dims)
    train = rng.normal(size=(n, dims)) @ mix + 5
    val = rng.normal(size=(40, dims)) @ mix + 5
    groups = np.array([0, 1] * 4 + [0] * 4 + [1] * 8)

    def direct(fit_on, on, cols):
        lw = LedoitWolf().fit(fit_on[:, cols])
        c = on[:, cols] - fit_on[:, cols].mean(axis=0)
        return np.sqrt(np.einsum("ij,jk,ik->i", c, np.linalg.inv(lw.covariance_), c))

    ref = reference.fit_reference(train, val, quantile=0.9, groups=groups)
    cols = [np.flatnonzero(groups == g) for g in (0, 1)]
    if n >= 10:
        oof = np.zeros((2, n))
        for keep, held in KFold(5, shuffle=True, random_state=0).split(train):
            for g in (0, 1):
                oof[g, held] = direct(train[keep], train[held], cols[g])
        scales = np.median(oof, axis=1)
        calibration = np.concatenate([(oof / scales[:, None]).sum(axis=0)])
        assert ref.folds == 5 and ref.threshold_on == "out-of-fold train (k=5) + val"
    else:   # too few train images for 5 folds: scales from the train images themselves, threshold on val
        scales = np.array([np.median(direct(train, train, c)) for c in cols])
        calibration = np.zeros(0)
        assert ref.folds == 0 and ref.threshold_on == "val"
    assert np.allclose(ref.scales, scales, rtol=1e-9)
    want = sum(direct(train, val, c) / s for c, s in zip(cols, scales))
    assert np.allclose(reference.distances(val, ref), want, rtol=1e-9)
    assert np.allclose(reference.layer_distances(val, ref).sum(axis=1), want, rtol=1e-12)
    pooled = np.concatenate([calibration, want])
    assert ref.threshold == pytest.approx(np.quantile(pooled, 0.9), rel=1e-9) and len(ref.calibration) == len(pooled)
    assert [round(s, 9) for s in ref.shrinkage] == [round(LedoitWolf().fit(train[:, c]).shrinkage_, 9) for c in cols]
    assert (ref.n_train, ref.n_val, ref.dims, ref.layers) == (n, 40, dims, 2)
    one = reference.fit_reference(train, val, quantile=0.9)              # no groups: one layer
    assert one.layers == 1 and np.allclose(reference.distances(val, one), direct(train, val, np.arange(dims)) / one.scales[0])
    no_val = reference.fit_reference(train, None, quantile=0.9, groups=groups)   # cross-validation folds: no val split
    assert no_val.n_val == 0 and no_val.threshold_on == ("out-of-fold train (k=5) (no val split)" if n >= 10 else
                                                         "train (no val split)")
    if n < 10:
        assert no_val.threshold == pytest.approx(np.quantile(reference.distances(train, no_val), 0.9), rel=1e-9)


def test_layer_groups_align_members_from_the_penultimate():
    assert reference.layer_groups(None, 4).tolist() == [0, 0, 0, 0]
    assert reference.layer_groups([[2, 1]], 3).tolist() == [0, 0, 1]
    assert reference.layer_groups([[2, 1], [1, 2, 1]], 7).tolist() == [1, 1, 2, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="add up to"):
        reference.layer_groups([[2, 1]], 4)


def test_a_reference_saved_before_layers_still_loads(tmp_path):
    """ood.npz written before per-layer references (one penultimate layer, unscaled) loads as one layer."""
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(50, 6)), rng.normal(size=(10, 6))
    ref = reference.fit_reference(train, None, 0.9, folds=0)
    np.savez(tmp_path / store.OOD_FILE, mean=ref.mean, factor=ref.factors[0] / ref.scales[0], threshold=1.5,
             quantile=0.9, n_train=50, n_val=0, dims=6, shrinkage=ref.shrinkage[0], threshold_on="val", method="old")
    old = reference.load_reference(tmp_path)
    assert old.layers == 1 and old.scales.tolist() == [1.0] and old.threshold == 1.5
    assert np.allclose(reference.distances(val, old), reference.distances(val, ref), rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_shifted_images_lie_farther_than_val_images(models, splits, kind):
    p = store.load_predictor(models[kind], engine="onnx")
    val = splits["val"]
    inverted = 1.0 - val
    noise = np.random.default_rng(0).random(val.shape, dtype=np.float32)
    d_val, d_inv, d_noise = (p.predict_scored(x)[1].mean() for x in (val, inverted, noise))
    assert d_inv > d_val and d_noise > d_val, (d_val, d_inv, d_noise)
    assert (p.predict_scored(noise)[1] > p.ood_threshold).mean() > 0.5


def test_ood_npz_is_part_of_the_model_id(models, tmp_path):
    d = shutil.copytree(models["scratch-dnn"], tmp_path / "m")
    e = models["ensemble"]
    assert store.weight_files(d) == ["model.json", "model.npz", "ood.npz", store.MONITOR_FILE, store.CARD_FILE,
                                     "model.onnx"]
    assert store.weight_files(e)[-4:] == ["ood.npz", store.MONITOR_FILE, store.CARD_FILE, "model.onnx"]
    before = model_id(d)
    ref = reference.load_reference(d)
    reference.save_reference(d, ref)                       # the same reference: the same id
    assert model_id(d) == before
    from dataclasses import replace

    reference.save_reference(d, replace(ref, threshold=ref.threshold * 2))
    assert model_id(d) != before
    with np.load(d / store.OOD_FILE, allow_pickle=False) as z:   # plain arrays only
        assert all(z[k].dtype != object for k in z.files)


def test_models_without_a_reference_still_predict(models, splits, tmp_path):
    x = splits["val"]
    d = shutil.copytree(models["cnn-adam"], tmp_path / "no-ood", ignore=shutil.ignore_patterns(store.OOD_FILE))
    meta = store.read_metadata(d)
    del meta["ood"]
    store.write_metadata(d, meta)
    export_onnx(d, x)                                # a graph with proba and features, no distance
    import onnx

    assert [o.name for o in onnx.load(str(d / store.ONNX_FILE)).graph.output] == ["proba", "features"]
    assert store.weight_files(d) == ["model.keras", store.MONITOR_FILE, store.CARD_FILE, "model.onnx"]
    for engine in ("onnx", "keras"):
        p = store.load_predictor(d, engine=engine)
        proba, dist = p.predict_scored(x)
        assert dist is None and p.ood_threshold is None and proba.shape == (len(x), 3)
        assert np.max(np.abs(proba - p.predict_proba(x))) <= 1e-5
    old = onnx.load(str(d / store.ONNX_FILE))       # a model.onnx from before features: "proba" only
    keep_outputs(old.graph, ["proba"])
    onnx.save(old, str(d / store.ONNX_FILE))
    p = store.load_predictor(d, engine="onnx")
    proba, dist = p.predict_scored(x)
    assert dist is None and np.max(np.abs(proba - store.load_predictor(d).predict_proba(x))) <= 1e-5
    with pytest.raises(ValueError, match="no output features"):
        p.features(x)


def test_cli_fits_models_trained_before_it(models, pre_out, tmp_path, capsys):
    d = shutil.copytree(models["scratch-dnn"], tmp_path / "models" / "scratch-dnn",
                        ignore=shutil.ignore_patterns(store.OOD_FILE))
    meta = store.read_metadata(d)
    del meta["ood"]
    store.write_metadata(d, meta)
    export_onnx(d)                                   # its model.onnx without ood_distance
    assert ood.main(["fit", str(tmp_path / "models"), "--data", str(pre_out), "--quantile", "0.5"]) == 0
    rec = store.read_metadata(d)["ood"]
    assert rec["quantile"] == 0.5 and rec["n_train"] == meta["data"]["train"]["images"] and rec["n_val"] > 0
    ref = reference.load_reference(d)
    want = reference.load_reference(models["scratch-dnn"])     # the same model and data as training: same reference
    assert np.allclose(ref.mean, want.mean, atol=1e-5) and _same_precision(ref, want)
    assert store.load_predictor(d, engine="onnx").has_ood() and "threshold" in capsys.readouterr().out


def test_a_distance_that_does_not_match_is_refused(models, splits, tmp_path, monkeypatch):
    d = shutil.copytree(models["scratch-dnn"], tmp_path / "m")
    before = (d / store.ONNX_FILE).read_bytes()
    real = reference.distances
    monkeypatch.setattr("cxr.models.onnx_export.distances", lambda f, ref: real(f, ref) * 1.01)
    with pytest.raises(ValueError, match="differs from the NumPy distance"):
        add_distance_to_onnx(d, splits["val"])
    assert (d / store.ONNX_FILE).read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in models["scratch-dnn"].iterdir())


def test_tf2onnx_fallback_has_features_too(splits, tmp_path):
    """A Keras layer the direct writer lacks (BatchNormalization): tf2onnx exports both outputs, the feature
    layers (pooled block, penultimate) recorded."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), L.Conv2D(4, 3, activation="relu"),
                              L.BatchNormalization(), L.MaxPooling2D(2), L.Flatten(), L.Dense(8, activation="relu"),
                              L.Dense(3, activation="softmax")])
    d = store.save_keras(model, tmp_path / "bn", {"name": "bn", "input": {"data_size": [SIZE, SIZE]}})
    x = splits["val"]
    export_onnx(d, x)
    graph = store.load_predictor(d, engine="onnx")
    got = graph.features(x)
    assert graph.feature_layers == [[4, 8]]                         # the pooled block (after BN), the penultimate
    assert got.shape == (len(x), 12) and np.max(np.abs(got - store.features_of(model, x))) <= FEATURES_ATOL
    assert np.ptp(got[:, :4], axis=0).max() > 1e-4


def test_reexport_over_a_reference_of_other_features_removes_it(models, splits, tmp_path):
    """A model exported before the layered features has an ood.npz of its penultimate features only: re-exporting
    it (new features) cannot keep that reference, so it is removed with a warning saying how to fit it again."""
    d = shutil.copytree(models["cnn-adam"], tmp_path / "m")
    rng = np.random.default_rng(0)
    reference.save_reference(d, reference.fit_reference(rng.normal(size=(40, 32)), None, 0.9))   # 32 dims: the old penultimate
    with pytest.warns(UserWarning, match="fit it again"):
        export_onnx(d, splits["val"])
    import onnx

    assert not (d / store.OOD_FILE).exists() and "ood" not in store.read_metadata(d)
    assert [o.name for o in onnx.load(str(d / store.ONNX_FILE)).graph.output] == ["proba", "features"]
    assert store.OOD_FILE not in store.read_metadata(d)["files"]
    export_onnx(d, splits["val"])                    # nothing stale left: exports quietly

