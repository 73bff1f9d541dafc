"""DICOM identity columns, the scope gate and the keyed patient id: unit checks against pydicom, then the preprocess
and score jobs on a PACS-like mix (frontal films, a lateral, CT, a hand, an SR without pixels, a multi-frame file)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from cxr.config import load_config
from cxr.quality.dicom_files import planted_phi, write_dicom
from cxr.scope.dicom_header import DICOM_COLUMNS, HEADER_COLUMNS, HeaderReader, patient_key_secret
from cxr.scope.rules import ScopeGate, ScopeRules
from cxr.datasets.synth import render_chest
from tests.conftest import SHARED_DATA

SIZE = 32
SECRET = "test-site-secret"

# (folder, file, write_dicom kwargs, expected status, words the reason must hold)
MIX = [
    ("COVID", "pa_0.dcm", {}, "ok", None),
    ("COVID", "pa_1.dcm", {"view": "AP"}, "ok", None),
    ("NORMAL", "pa_2.dcm", {}, "ok", None),
    ("NORMAL", "pa_3.dcm", {"view": None, "body_part": None}, "ok", None),
    ("VIRAL", "pa_4.dcm", {}, "ok", None),
    ("VIRAL", "pa_5.dcm", {}, "ok", None),
    ("COVID", "lateral.dcm", {"view": "LL"}, "out_of_scope", "ViewPosition LL: lateral view"),
    ("NORMAL", "ct.dcm", {"modality": "CT", "view": None}, "out_of_scope", "Modality CT"),
    ("VIRAL", "hand.dcm", {"modality": "CR", "body_part": "HAND"}, "out_of_scope", "BodyPartExamined HAND"),
    ("COVID", "report.dcm", {"modality": "SR", "body_part": None, "view": None, "pixels": None}, "out_of_scope",
     "no pixel data"),
    ("NORMAL", "stack.dcm", {"frames": 3}, "out_of_scope", "NumberOfFrames 3"),
]


def _pixels(label: str, seed: int) -> np.ndarray:
    img = render_chest(label if label in ("COVID", "NORMAL", "VIRAL") else "NORMAL", size=96, rng=seed)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def write_mix(root: Path) -> dict[str, dict]:
    """The PACS-like archive; {relative path: {kwargs, status, reason words, identity tags, phi}}."""
    files = {}
    for i, (folder, name, kwargs, status, words) in enumerate(MIX):
        kwargs = dict(kwargs)
        pixels = kwargs.pop("pixels", _pixels(folder, i))
        phi = planted_phi(i)
        tags = write_dicom(root / folder / name, pixels, seed=i, phi=phi, **kwargs)
        files[f"{folder}/{name}"] = {"status": status, "words": words, "tags": tags, "phi": phi}
    return files


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    return root, write_mix(root)


def _dicoms():
    shared = sorted((SHARED_DATA / "dicom").glob("*.dcm"))
    return shared


# ------------------------------------------------------------------------------------------------- unit

def test_header_columns_equal_pydicom(mix):
    root, files = mix
    paths = [root / rel for rel in files] + _dicoms()
    reader = HeaderReader(SECRET.encode())
    assert len(paths) >= len(MIX)
    for path in paths:
        header = reader.read(path.read_bytes())
        ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
        assert header is not None, path
        for col, (keyword, kind) in HEADER_COLUMNS.items():
            value = ds.get(keyword)
            got = header.columns[col]
            if value is None or value == "":
                assert got is None, (path.name, col, got)
            elif kind == "str":
                assert got == str(value).strip(), (path.name, col)
            elif kind == "int":
                assert got == int(value), (path.name, col)
            elif kind == "multi":
                values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
                assert got.split("\\") == [str(v).strip() for v in values], (path.name, col)
            elif kind == "date":
                assert got == dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])), (path.name, col)
            else:
                assert got == pytest.approx(float(value[int(kind[-1])])), (path.name, col)
    for rel, info in files.items():   # the identity the writer put in is what comes out
        cols = reader.read((root / rel).read_bytes()).columns
        for key, value in info["tags"].items():
            assert cols[key] == value, (rel, key)


def test_shared_dicoms_are_in_scope():
    paths = _dicoms()
    if not paths:
        pytest.skip(f"{SHARED_DATA / 'dicom'} is absent (it lives in ../shared beside the project)")
    gate = ScopeGate(HeaderReader(None), ScopeRules())
    for path in paths:   # frontal CR/DX chest films, some with the view or body part left empty
        columns, reason = gate.check(path.read_bytes())
        assert reason is None, (path.name, reason)
        assert columns["sop_instance_uid"] and columns["modality"] in ("CR", "DX")


def test_each_out_of_scope_kind_gets_its_reason(mix):
    root, files = mix
    gate = ScopeGate(HeaderReader(None), ScopeRules())
    for rel, info in files.items():
        _, reason = gate.check((root / rel).read_bytes())
        if info["status"] == "ok":
            assert reason is None, (rel, reason)
        else:
            assert reason and info["words"] in reason, (rel, reason)


def test_rules_follow_conf_and_flags():
    config = load_config(overrides={"scope.views": ["PA", "AP", "LL", ""], "scope.modalities": ["cr", "dx", "ct"]})
    rules = ScopeRules.from_config(config)
    assert rules.views == ("PA", "AP", "LL", "") and rules.modalities == ("CR", "DX", "CT")
    assert ScopeRules.from_config(config, ood="skip").ood == "skip"
    with pytest.raises(ValueError, match="scope.ood"):
        ScopeRules.from_config(config, ood="drop")


def test_patient_key_is_keyed_stable_and_null_without_secret(mix, monkeypatch, tmp_path):
    root, files = mix
    data = (root / "COVID/pa_0.dcm").read_bytes()
    pid = files["COVID/pa_0.dcm"]["phi"]["PatientID"]
    a = HeaderReader(b"one").read(data).columns["patient_key"]
    assert a == HeaderReader(b"one").read(data).columns["patient_key"]            # stable across runs
    assert a != HeaderReader(b"two").read(data).columns["patient_key"]            # differs with another secret
    assert pid not in a and a != __import__("hashlib").sha256(pid.encode()).hexdigest()   # never a plain hash
    assert HeaderReader(None).read(data).columns["patient_key"] is None           # no secret: null
    monkeypatch.delenv("CXR_PATIENT_KEY_SECRET", raising=False)
    assert patient_key_secret({}) is None
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    assert patient_key_secret({"patient_key_secret_file": str(secret_file)}) == b"from-a-file"
    monkeypatch.setenv("CXR_PATIENT_KEY_SECRET", "from-env")
    assert patient_key_secret({"patient_key_secret_file": str(secret_file)}) == b"from-env"
    assert "from-env" not in repr(HeaderReader(b"from-env"))


# ---------------------------------------------------------------------------------------- preprocess job

def _table(path: Path):
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="module")
def preprocessed(spark, mix, tmp_path_factory):
    from cxr.spark.preprocess import run

    import os
    root, _ = mix
    os.environ["CXR_PATIENT_KEY_SECRET"] = SECRET
    try:
        out = tmp_path_factory.mktemp("pacs_pre") / "out"
        result = run(spark, str(root), str(out), load_config(overrides={"preprocess.size": SIZE}))
    finally:
        del os.environ["CXR_PATIENT_KEY_SECRET"]
    return out, result


def test_preprocess_keeps_out_of_scope_files_apart_and_counts_them(preprocessed, mix):
    out, result = preprocessed
    _, files = mix
    images, errors, scope = _table(out / "images"), _table(out / "errors"), _table(out / "out_of_scope")
    c = result["counts"]
    assert result["accounted"]
    assert c["input"] == len(MIX) == c["written"] + c["rejected"] + c["out_of_scope"] + c["duplicates"]
    expected_ok = {rel for rel, info in files.items() if info["status"] == "ok"}
    assert {p.split("/pacs", 1)[1].split("/", 1)[1] for p in images["path"]} == expected_ok
    assert len(errors) == 0
    assert len(scope) == len(MIX) - len(expected_ok) == c["out_of_scope"]
    for _, row in scope.iterrows():
        rel = row["path"].split("/pacs", 1)[1].split("/", 1)[1]
        assert files[rel]["words"] in row["reason"] and row["stage"] == "scope"
        assert row["sop_instance_uid"] == files[rel]["tags"]["sop_instance_uid"]


def test_images_carry_dicom_identity_and_split_by_keyed_patient(preprocessed, mix):
    out, _ = preprocessed
    _, files = mix
    images = _table(out / "images")
    assert set(DICOM_COLUMNS) <= set(images.columns)
    schema = pq.read_schema(next((out / "images").glob("*.parquet")))
    assert str(schema.field("study_date").type) == "date32[day]"
    assert str(schema.field("dicom_rows").type) == "int32"
    reader = HeaderReader(SECRET.encode())
    for _, row in images.iterrows():
        rel = row["path"].split("/pacs", 1)[1].split("/", 1)[1]
        tags = files[rel]["tags"]
        assert (row["sop_instance_uid"], row["study_instance_uid"], row["accession_number"]) == (
            tags["sop_instance_uid"], tags["study_instance_uid"], tags["accession_number"])
        key = reader.patient_key(files[rel]["phi"]["PatientID"])
        assert row["patient_key"] == key and row["patient_id"] == f"dicom:{key}"


# --------------------------------------------------------------------------------------------- score job

def _chests(n: int, seed: int) -> np.ndarray:
    """(n, SIZE, SIZE, 1) float32 synthetic chests as the model sees them."""
    import cv2

    out = [cv2.resize(render_chest(("COVID", "NORMAL", "VIRAL")[i % 3], size=96, rng=seed + i), (SIZE, SIZE),
                      interpolation=cv2.INTER_AREA) for i in range(n)]
    return np.stack(out).astype(np.float32)[..., None]


@pytest.fixture(scope="module")
def ood_model(preprocessed, tmp_path_factory):
    """A tiny CNN with an OOD reference fitted on synthetic chests (threshold: 99.5% of other chests)."""
    from cxr.models import store
    from cxr.models.onnx_export import add_distance_to_onnx
    from cxr.scope.reference import fit_reference, save_reference
    from tests.scoring_models import tiny_keras_cnn

    _, result = preprocessed
    d = tiny_keras_cnn(tmp_path_factory.mktemp("scope_models") / "cnn", result["params"], SIZE)
    predictor = store.load_predictor(d, engine="onnx")
    ref = fit_reference(predictor.features(_chests(60, 100)), predictor.features(_chests(30, 500)), 0.995)
    save_reference(d, ref)
    add_distance_to_onnx(d, _chests(8, 900), ref)
    return d


def _rel(path: str) -> str:
    return path.split("/pacs", 1)[1].split("/", 1)[1]


def _score(spark, root, model, out, **overrides):
    from cxr.spark.score import run

    config = load_config(overrides={"preprocess.size": SIZE, "score.batch_size": 8, **overrides})
    return run(spark, str(root), str(model), str(out), config)


def test_score_writes_identity_ood_columns_and_keeps_out_of_scope_files_out(spark, mix, ood_model, tmp_path):
    root, files = mix
    out = tmp_path / "preds"
    record = _score(spark, root, ood_model, out)
    c = record["counts"]
    n_ok = sum(info["status"] == "ok" for info in files.values())
    assert record["accounted"] and c["input"] == len(MIX)
    assert (c["scored"], c["rejected"], c["out_of_scope"]) == (n_ok, 0, len(MIX) - n_ok)
    preds, scope = _table(out / "predictions"), _table(out / "out_of_scope")
    assert set(DICOM_COLUMNS) <= set(preds.columns) and {"ood_distance", "in_distribution"} <= set(preds.columns)
    for _, row in preds.iterrows():
        tags = files[_rel(row["path"])]["tags"]
        assert (row["sop_instance_uid"], row["series_instance_uid"], row["study_date"]) == (
            tags["sop_instance_uid"], tags["series_instance_uid"], tags["study_date"])
        assert row["patient_key"] is None          # no secret in this run: null, never a plain hash
        assert row["ood_distance"] > 0 and row["in_distribution"] == (
            row["ood_distance"] <= record["ood"]["threshold"]
            and row["scope_score"] >= record["frontal_check"]["threshold"])   # either pixel signal puts it out
    assert len(scope) == c["out_of_scope"]
    for _, row in scope.iterrows():
        assert files[_rel(row["path"])]["words"] in row["reason"] and row["stage"] == "scope"
        assert row["sop_instance_uid"] == files[_rel(row["path"])]["tags"]["sop_instance_uid"]
    # the state remembers them: the next night opens nothing, out-of-scope files included
    again = _score(spark, root, ood_model, out)
    assert again["counts"]["skipped_unchanged"] == len(MIX) and again["bytes_read"] == 0
    state = _table(out / "state")
    assert sorted(state["status"].value_counts().items()) == [("out_of_scope", len(MIX) - n_ok), ("scored", n_ok)]


def test_ood_flag_keeps_probabilities_and_skip_makes_out_of_scope_rows(spark, ood_model, tmp_path):
    import cv2

    root = tmp_path / "pacs" / "archive"   # "/pacs/" keeps _rel working
    (root / "NORMAL").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        chest = np.clip(np.round(render_chest("NORMAL", size=96, rng=700 + i) * 255), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "NORMAL" / f"chest{i}.png"), chest)
        cv2.imwrite(str(root / "NORMAL" / f"noise{i}.png"), rng.integers(0, 256, (96, 96), dtype=np.uint8))
    flagged = _score(spark, root, ood_model, tmp_path / "flag")
    preds = _table(tmp_path / "flag" / "predictions")
    noise = preds[preds["path"].str.contains("noise")]
    assert flagged["counts"]["scored"] == 6 and len(noise) == 3
    # a random tiny CNN's features are weak: at least one noise image must be out, all keep their probabilities
    assert (~noise["in_distribution"]).any() and noise["p_covid"].notna().all()
    assert noise["ood_distance"].mean() > preds.loc[~preds.index.isin(noise.index), "ood_distance"].mean()
    assert preds["sop_instance_uid"].isna().all()   # not DICOM: the identity columns are null
    assert flagged["scored_out_of_distribution"] == int((~preds["in_distribution"]).sum())
    skipped = _score(spark, root, ood_model, tmp_path / "skip", **{"scope.ood": "skip"})
    c = skipped["counts"]
    assert (c["scored"], c["out_of_scope"]) == (6 - int((~preds["in_distribution"]).sum()),
                                                int((~preds["in_distribution"]).sum()))
    scope = _table(tmp_path / "skip" / "out_of_scope")
    assert set(scope["stage"]) == {"ood"} and scope["reason"].str.startswith("out of distribution").all()
    assert set(scope["path"]) == set(preds.loc[~preds["in_distribution"], "path"])
