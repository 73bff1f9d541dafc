"""The frontal-film check (cxr.scope.frontal): its ONNX graph against the Keras network it came from, real shared
films through the project's own preprocessing (a frontal film passes, the same film sideways, mirrored into one
side or cut to one lung does not), its thresholds recomputed from the films they say they were set on,
and the score job counting each reason of the gate (header rules, frontal check, distance)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr.scope import frontal
from cxr.scope.frontal import BUILTIN_DIR, FrontalCheck, read_meta
from cxr.scope.negatives import REFRAMINGS
from tests.conftest import SHARED_DATA, shared_data

RECOMMENDED = {"size": 96, "resize_mode": "pad", "decode_reduction": "auto"}   # conf/recommended.yaml's images
FILMS_PER_FOLDER = 3


def _prepared(data: bytes, **params) -> np.ndarray:
    """bytes -> the model's image, as the score job makes it (cxr.image.pipeline)."""
    from cxr.image.pipeline import PreprocessParams, preprocess_bytes

    return preprocess_bytes(data, PreprocessParams(**{**RECOMMENDED, **params}))[1]


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def test_films():
    """The first FILMS_PER_FOLDER test-split films (by path) of each shared folder: never trained on."""
    from cxr.scope.frontal_data import FOLDERS, heldout_films

    shared_data("cxr")
    shared_data("cxr-adult")
    films = heldout_films(SHARED_DATA, ("test",))
    return [SHARED_DATA / rel for folder in FOLDERS for rel in sorted(r for r, f, _ in films if f == folder)
            [:FILMS_PER_FOLDER]]


def test_onnx_equals_keras_within_1e_4(test_films):
    members = frontal.load_keras_members(BUILTIN_DIR)
    assert len(members) == read_meta(BUILTIN_DIR)["members"] >= 1   # one graph: the members' mean
    check = FrontalCheck.load()
    rng = np.random.default_rng(0)
    images = [_prepared(p.read_bytes()) for p in test_films]
    images += [_prepared(_png(REFRAMINGS[k](cv2.imread(str(test_films[0]), cv2.IMREAD_GRAYSCALE), rng)))
               for k in REFRAMINGS]
    images += [rng.integers(0, 256, (96, 96), dtype=np.uint8) for _ in range(4)]
    stack = np.stack(images)
    want = frontal.keras_scores(members, stack)
    got = check.scores(stack)
    assert got.shape == want.shape == (len(images),)
    assert np.max(np.abs(got - want)) <= 1e-4
    assert got.min() < check.threshold < got.max()   # the batch holds films on both sides: the check can fail
    assert read_meta(BUILTIN_DIR)["onnx_check"]["max_abs_diff"] <= 1e-4


# the recommended profile's images (96 px pad) and conf/default.yaml's (224 px stretch)
PREPROCESSINGS = {"96-pad": {}, "224-stretch": {"size": 224, "resize_mode": "stretch"}}


@pytest.mark.parametrize("kind", ["rotated_90", "mirrored_one_side", "one_lung"])
def test_a_frontal_film_passes_and_the_same_film_reframed_does_not(test_films, kind):
    """Every film passes the check's verdict (its network and the mirror prior) and every re-framed copy is kept out,
    under both preprocessings; the network alone always finds the copy less frontal than its film, and a film's
    half mirrored into a whole picture is the mirror prior's (asymmetry under its threshold)."""
    check = FrontalCheck.load()
    assert check.asymmetry_threshold is not None
    rng = np.random.default_rng(31)
    for path in test_films:
        data = path.read_bytes()
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        changed = REFRAMINGS[kind](gray, rng)
        for name, params in PREPROCESSINGS.items():
            scores, asym = check.assess(np.stack([_prepared(data, **params), _prepared(_png(changed), **params)]))
            inside, reasons = check.verdicts(scores, asym)
            assert inside[0], f"{path.name} ({name}): frontal film kept out: {reasons[0]}"
            assert not inside[1], (f"{kind} of {path.name} ({name}) passes (scope {scores[1]:.3f}, "
                                   f"asymmetry {asym[1]:.3f})")
            assert scores[1] < scores[0]   # always less frontal than the film it came from
            if kind == "mirrored_one_side":
                assert asym[1] < check.asymmetry_threshold <= asym[0]


def test_the_thresholds_come_from_films_the_scoring_members_never_saw():
    """frontal.json's threshold is the recorded quantile of (a) the shipped Keras members' mean scores on the val
    films of both shared folders, recomputed here from the films themselves, pooled with (b) the out-of-fold scores
    of the train films kept in frontal.calibration.npz: every train film under every held-out preprocessing, in the
    fold its patient hashes to, no val or test film among them. The mirror prior's threshold is the recorded
    quantile of the train and val films' own asymmetry. The training films are the train split's."""
    from cxr.scope import frontal_data as fd
    from cxr.scope.frontal_train import CALIBRATION_FILE

    shared_data("cxr")
    shared_data("cxr-adult")
    meta = read_meta(BUILTIN_DIR)
    films = fd.load_films(SHARED_DATA)
    val = fd.heldout_set(films, ("val",))
    assert set(val.split) == {"val"} and set(val.folder) == set(fd.FOLDERS)
    scores = frontal.keras_scores(frontal.load_keras_members(BUILTIN_DIR), val.x)
    folds = meta["calibration"]["folds"]
    with np.load(BUILTIN_DIR / CALIBRATION_FILE, allow_pickle=False) as z:
        oof = {k: z[k] for k in z.files}
    train = {f.path: f for f in films if f.split == "train"}
    assert sorted(zip(oof["path"].tolist(), oof["variant"].tolist())) == sorted(
        (path, v) for path in train for v in fd.HELDOUT_VARIANTS)
    assert [fd.calibration_fold(train[p].group, folds, meta["seed"]) for p in oof["path"].tolist()] == \
        oof["fold"].tolist()
    assert len(set(oof["fold"].tolist())) == folds >= 2
    sample = np.concatenate([oof["score"], scores])
    assert abs(float(np.quantile(sample, meta["threshold_quantile"])) - meta["threshold"]) <= 1e-4
    assert meta["calibration"]["sha256"] == hashlib.sha256((BUILTIN_DIR / CALIBRATION_FILE).read_bytes()).hexdigest()
    known = fd.heldout_set(films, ("train", "val"))
    asym = frontal.asymmetry(frontal.scope_input(known.x))
    assert abs(float(np.quantile(asym, meta["asymmetry_quantile"])) - meta["asymmetry_threshold"]) <= 1e-6
    train_paths = sorted(train)
    assert meta["films_sha256"] == hashlib.sha256("\n".join(train_paths).encode()).hexdigest()
    assert not {f.path for f in films if f.split != "train"} & set(train_paths)
    assert meta["training_films"] == {k: sum(f.folder == k for f in films if f.split == "train") for k in fd.FOLDERS}


def test_out_of_fold_calibration_scores_each_train_film_by_members_that_never_saw_it():
    """frontal_train --folds K (measured, not shipped): every train film is scored once per held-out preprocessing,
    in the fold its patient hashes to, by members trained on the other folds' films only (the training set's size
    says which films it was made from: COPIES + REFRAMED_PER_FILM images per film, plus the fixed renderings)."""
    from cxr.scope import frontal_data as fd
    from cxr.scope.frontal_train import out_of_fold_scores

    shared_data("cxr")
    shared_data("cxr-adult")
    groups = {p: g for p, _, g in fd.film_groups(SHARED_DATA)}
    rows = [r for r in fd.film_splits(SHARED_DATA) if r[2] == "train"][::40]
    films = [fd.Film(p, f, s, fd.decode_film((SHARED_DATA / p).read_bytes()), groups[p]) for p, f, s in rows]
    lines: list[str] = []
    oof = out_of_fold_scores(films, None, seed=31, members=1, epochs=1, folds=2, threads=2, log=lines.append)
    assert sorted(zip(oof["path"].tolist(), oof["variant"].tolist())) == sorted(
        (f.path, v) for f in films for v in fd.HELDOUT_VARIANTS)
    fold_of = {f.path: fd.calibration_fold(f.group, 2, 31) for f in films}
    assert [fold_of[p] for p in oof["path"].tolist()] == oof["fold"].tolist()
    assert set(fold_of.values()) == {0, 1}
    fixed = fd.SYNTH_CHESTS + len(fd.RENDERED) * fd.RENDERED_EACH + 4 * fd.PICTURES_EACH
    for k, line in enumerate(lines):
        others = sum(v != k for v in fold_of.values())
        assert f"trained on {others * (fd.COPIES + fd.REFRAMED_PER_FILM) + fixed} images" in line, line
    assert np.all((oof["score"] >= 0) & (oof["score"] <= 1))


def test_verdicts_name_each_signal_that_fired():
    inside, reasons = frontal.verdicts(np.array([0.9, 0.02, 0.9, 0.01]), 0.3, np.array([1.0, 2.0, 9.0, 9.5]), 7.0)
    assert inside.tolist() == [True, False, False, False]
    assert reasons[0] is None
    assert reasons[1] == "not a frontal chest film (scope 0.02 under 0.30)"
    assert reasons[2] == "unlike the training films (distance 9.00 over 7.00)"
    assert reasons[3].startswith(frontal.NOT_FRONTAL) and frontal.UNLIKE_TRAINING in reasons[3]
    inside, reasons = frontal.verdicts(None, None, np.array([1.0, 8.0]), 7.0)   # frontal check off
    assert inside.tolist() == [True, False] and reasons[0] is None
    inside, reasons = frontal.verdicts(np.array([0.9, 0.9]), 0.3, None, None, np.array([0.35, 0.05]), 0.2)
    assert inside.tolist() == [True, False]
    assert reasons[1] == "not a frontal chest film (mirror-symmetric: asymmetry 0.05 under 0.20)"


def test_asymmetry_is_zero_for_a_mirror_image_and_ignores_contrast():
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (64, 32)).astype(np.uint8)
    mirrored = np.concatenate([half, half[:, ::-1]], axis=1)[None]
    lopsided = np.concatenate([half, rng.integers(0, 256, (64, 32)).astype(np.uint8)], axis=1)[None]
    a = frontal.asymmetry(frontal.scope_input(np.concatenate([mirrored, lopsided])))
    assert a[0] == 0 and a[1] > 0.5
    scaled = frontal.asymmetry(frontal.scope_input(lopsided // 2))   # half the contrast, the same ratio
    assert abs(float(scaled[0]) - float(a[1])) < 0.02


def _table(path: Path):
    return pq.read_table(path).to_pandas() if path.is_dir() else None


def test_score_job_counts_each_reason(spark, tmp_path, test_films):
    """A tagged lateral DICOM (header rules), real films turned sideways (frontal check), noise and the films
    themselves (the distance of a model whose reference is fitted on train films, its threshold at their median):
    the run record, the monitoring and the run page count each reason as the tables hold it."""
    from cxr.config import load_config
    from cxr.models import store
    from cxr.models.onnx_export import add_distance_to_onnx
    from cxr.quality.dicom_files import write_dicom
    from cxr.scope.reference import fit_reference, save_reference
    from cxr.spark.score import run
    from tests.scoring_models import tiny_keras_cnn

    size = 64
    root = tmp_path / "archive"
    (root / "NORMAL").mkdir(parents=True)
    rng = np.random.default_rng(0)
    grays = [cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE) for p in test_films]
    for i, g in enumerate(grays):
        (root / "NORMAL" / f"film{i}.png").write_bytes(_png(g))
        (root / "NORMAL" / f"sideways{i}.png").write_bytes(_png(np.ascontiguousarray(np.rot90(g))))
    for i in range(2):
        cv2.imwrite(str(root / "NORMAL" / f"noise{i}.png"), rng.integers(0, 256, (256, 256), dtype=np.uint8))
    write_dicom(root / "NORMAL" / "lateral.dcm", cv2.resize(grays[0], (256, 256)), seed=1, modality="DX", view="LL")

    params = {"size": size, "resize_mode": "pad", "decode_reduction": "auto"}
    model = tiny_keras_cnn(tmp_path / "cnn", params, size)
    predictor = store.load_predictor(model, engine="onnx")
    from cxr.scope.frontal_data import film_splits

    train = [SHARED_DATA / r for r, _, s in film_splits(SHARED_DATA) if s == "train"][:60]
    x = np.stack([_prepared(p.read_bytes(), **params) for p in train])[..., None].astype(np.float32) / 255
    # threshold at the median: about half of the films are "unlike the training films" too, so that this reason
    # fires whatever a random tiny CNN's features make of the noise
    ref = fit_reference(predictor.features(x[:40]), predictor.features(x[40:]), 0.5)
    save_reference(model, ref)
    add_distance_to_onnx(model, x[:8], ref)

    config = load_config(overrides={**{f"preprocess.{k}": v for k, v in params.items()}, "score.batch_size": 8})
    record = run(spark, str(root), str(model), str(tmp_path / "preds"), config)
    preds, scope = _table(tmp_path / "preds" / "predictions"), _table(tmp_path / "preds" / "out_of_scope")
    reason = preds["ood_reason"].fillna("")
    want = {"header_rules": int((scope["stage"] == "scope").sum()),
            "not_frontal": int(reason.str.contains(frontal.NOT_FRONTAL).sum()),
            "unlike_training": int(reason.str.contains(frontal.UNLIKE_TRAINING).sum())}
    assert record["scope_reasons"] == want == record["monitoring"]["stats"]["scope_reasons"]
    assert want["header_rules"] == 1 and want["not_frontal"] >= len(grays) and want["unlike_training"] >= 1
    sideways = preds[preds["path"].str.contains("sideways")]
    assert sideways["ood_reason"].str.startswith(frontal.NOT_FRONTAL).all()
    assert not sideways["in_distribution"].any() and sideways["p_normal"].notna().all()   # flag: kept
    films_rows = preds[preds["path"].str.contains("film")]
    # the job's scope_score is the check's own score of the model's image, and it decides the reason; the films
    # themselves pass but for the check's known error (~2% of held-out frontal films, docs/scope_gate.md): here at
    # 64 px, a size its threshold was not set on, at most one of the six
    check = FrontalCheck.load()
    want_scores, asym = check.assess(np.stack([_prepared((root / "NORMAL" / Path(p).name).read_bytes(), **params)
                                              for p in films_rows["path"]]))
    np.testing.assert_allclose(films_rows["scope_score"].to_numpy(), want_scores, atol=1e-5)
    assert record["frontal_check"]["threshold"] == check.threshold
    assert record["frontal_check"]["asymmetry_threshold"] == check.asymmetry_threshold
    out = ~check.verdicts(films_rows["scope_score"].to_numpy(), asym)[0]
    assert out.sum() <= 1
    assert (films_rows["ood_reason"].fillna("").str.contains(frontal.NOT_FRONTAL).to_numpy() == out).all()
    assert record["scored_out_of_distribution"] == int((~preds["in_distribution"]).sum())
    page = (tmp_path / "preds" / "reports" / f"{record['run_id']}.html").read_text()
    for key, n in want.items():
        assert f'id="reason-{key}">{n}<' in page
    json.dumps(record)   # the record stays plain JSON
