"""Source as data (issue 30): the `source` column from manifests and DICOM site tags, per-(source, class) metrics,
leave-one-source-out folds, the confound probe, source-balanced weights, site augmentation, the model card, and
the score job's warning on films from a site the model never saw. The end-to-end test runs the real jobs with
the recommended profile on a slice of both shared folders."""
from __future__ import annotations

import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxr import CLASSES
from cxr.common.manifest import NO_SOURCE, read_manifests, site_source
from cxr.evaluate import by_source, confound
from cxr.evaluate.crossval import source_assignment, train_mask
from cxr.quality.dicom_files import write_dicom
from cxr.scope.dicom_header import HeaderReader
from cxr.train.core import class_weights, row_weights
from tests.conftest import load_job as job, shared_data
from tests.train_data import pre_out  # noqa: F401 (fixture)

SITE = {"InstitutionName": "Vrellmont Clinic", "StationName": "XR-ROOM-7", "Manufacturer": "Acme Imaging"}


# ----------------------------------------------------------------------------- the source column
def _dicom_bytes(tmp_path, name, tags):
    path = tmp_path / f"{name}.dcm"
    write_dicom(path, np.full((64, 64), 120, np.uint8), seed=len(name), extra=tags)
    return path.read_bytes()


def test_dicom_site_key_is_keyed_stable_never_plain_and_differs_by_secret(tmp_path):
    data = _dicom_bytes(tmp_path, "a", SITE)
    key = HeaderReader(b"secret-one").read(data).columns["site_key"]
    assert key and len(key) == 64
    assert HeaderReader(b"secret-one").read(data).columns["site_key"] == key             # stable
    assert HeaderReader(b"secret-two").read(data).columns["site_key"] != key             # keyed
    assert HeaderReader(None).read(data).columns["site_key"] is None                     # no secret: null
    other = _dicom_bytes(tmp_path, "b", {**SITE, "StationName": "XR-ROOM-8"})
    assert HeaderReader(b"secret-one").read(other).columns["site_key"] != key            # another machine
    columns = HeaderReader(b"secret-one").read(data).columns
    # the institution and station never appear in plain (Manufacturer is a plain column of its own: a vendor)
    assert not any(SITE[t] in str(v) for v in columns.values() for t in ("InstitutionName", "StationName"))
    assert site_source(key) == f"site:{key[:16]}" and site_source(None) is None


def test_manifests_give_patient_and_source_by_sha256_or_relative_path(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("sha256,patient_id,source\ns1,p1,siteA\ns2,p2,siteA\n")
    b.write_text("sha256,source\ns3,siteB\n")
    facts, info = read_manifests([str(a), str(b)], ["file:/x", "file:/y"])
    assert facts.of({"sha256": "s1"}) == ("p1", "siteA") and facts.of({"sha256": "s3"}) == (None, "siteB")
    assert facts.of({"sha256": "zz"}) == (None, None) and info["sources"] == ["siteA", "siteB"]
    c = tmp_path / "c.csv"
    c.write_text("relative_path,patient_id,source\nNORMAL/x.png,p9,siteC\n")
    facts, _ = read_manifests([str(c)], ["file:/root"])
    assert facts.of({"path": "file:/root/NORMAL/x.png"}) == ("p9", "siteC")
    with pytest.raises(ValueError, match="one per input"):
        read_manifests([str(c)], ["file:/root", "file:/other"])


# ----------------------------------------------------------------------------- metrics and folds
def test_per_source_cells_equal_a_hand_computed_confusion_matrix():
    # truth / call / source, 10 images: siteA COVID 3 (2 right, 1 called NORMAL), siteA NORMAL 2 (both right),
    # siteB NORMAL 4 (1 right, 3 called COVID), unknown source VIRAL 1 (right)
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 2])
    s = ["A", "A", "A", "A", "A", "B", "B", "B", "B", None]
    rows = {(r["source"], r["class"]): r for r in by_source.cells(y, p, s)}
    assert set(rows) == {("A", "COVID"), ("A", "NORMAL"), ("B", "NORMAL"), (NO_SOURCE, "VIRAL")}
    assert (rows["A", "COVID"]["n"], rows["A", "COVID"]["correct"], rows["A", "COVID"]["called_NORMAL"]) == (3, 2, 1)
    assert rows["B", "NORMAL"]["recall"] == pytest.approx(0.25) and rows["B", "NORMAL"]["called_COVID"] == 3
    assert rows["A", "NORMAL"]["recall"] == 1.0 and rows[NO_SOURCE, "VIRAL"]["n"] == 1
    assert rows["B", "NORMAL"]["recall_low"] < 0.25 < rows["B", "NORMAL"]["recall_high"]
    assert "**0.250" in by_source.table(list(rows.values()))


def _pool():
    """COVID from ieee and mhh, NORMAL from kermany and rsna, VIRAL from kermany only; 2 images per patient."""
    cells = [("COVID", "ieee"), ("COVID", "mhh"), ("NORMAL", "kermany"), ("NORMAL", "rsna"), ("VIRAL", "kermany")]
    y, src, pid = [], [], []
    for ci, (c, s) in enumerate(cells):
        for i in range(12):
            y.append(CLASSES.index(c))
            src.append(s)
            pid.append(f"{s}-{c}-{i // 2}")
    n = len(y)
    return SimpleNamespace(y=np.array(y), source=np.array(src, dtype=object), patient_id=np.array(pid, dtype=object),
                           sha256=np.array([f"h{i}" for i in range(n)], dtype=object))


def test_leave_one_source_out_never_puts_a_source_in_train_and_test():
    data = _pool()
    assignment, folds = source_assignment(data, [42, 43])
    assert [f["source"] for f in folds] == ["ieee", "kermany", "mhh", "rsna"]
    assert [f["kept_in_training"] for f in folds] == [[], ["VIRAL"], [], []]
    labels = np.asarray(CLASSES)[data.y]
    for f in folds:
        mine = assignment[assignment["seed"] == 42].set_index("sha256")
        fold_of = mine["fold"].reindex(data.sha256).fillna(-1).astype(int).to_numpy()
        held = fold_of == f["fold"]
        train = train_mask(fold_of, data.patient_id, f["fold"])
        held_cells = set(zip(data.source[held], labels[held]))
        train_cells = set(zip(data.source[train], labels[train]))
        assert held_cells and not held_cells & train_cells      # no held-out (source, class) in training
        assert not set(data.patient_id[held]) & set(data.patient_id[train])
        for c in f["held_out_classes"]:                          # the class is still learnt, from elsewhere
            assert any(lab == c for _, lab in train_cells)
    # VIRAL has one source: never held out
    assert not set(assignment["sha256"]) & set(data.sha256[labels == "VIRAL"])
    with pytest.raises(ValueError, match="two or more sources"):
        source_assignment(SimpleNamespace(**{**vars(data), "source": np.array(["one"] * len(data.y), dtype=object)}),
                          [42])


def test_source_balanced_weights_give_each_source_of_a_class_an_equal_share():
    data = _pool()
    keep = np.r_[0:12, 12:16, 24:36, 36:60]        # COVID: ieee 12, mhh 4
    y, src = data.y[keep], data.source[keep]
    cw = class_weights(y, "balanced_by_source", src)
    w = row_weights(cw, y, src)
    per_class = {c: w[y == i].sum() for i, c in enumerate(CLASSES)}
    assert per_class["COVID"] == pytest.approx(per_class["NORMAL"]) == pytest.approx(per_class["VIRAL"])
    assert w[(y == 0) & (src == "ieee")].sum() == pytest.approx(w[(y == 0) & (src == "mhh")].sum())
    assert w.sum() == pytest.approx(len(y))
    assert row_weights(class_weights(y, "balanced"), y, src) is None


# ----------------------------------------------------------------------------- the confound probe
def _meta(confounded: bool, n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Files whose size and format give away the source; the class is the source (confounded) or not."""
    rng = np.random.default_rng(seed)
    sources = np.array(["small-png", "big-jpeg", "mid-png"])[rng.integers(0, 3, n)]
    labels = (np.array(CLASSES)[np.searchsorted(["big-jpeg", "mid-png", "small-png"], sources)]
              if confounded else np.array(CLASSES)[rng.integers(0, 3, n)])
    width = np.where(sources == "small-png", 224, np.where(sources == "big-jpeg", 2000, 640)) + rng.integers(0, 5, n)
    return pd.DataFrame({"sha256": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "label": labels, "source": sources, "orig_width": width, "orig_height": width,
                         "source_format": np.where(sources == "big-jpeg", "JPEG", "PNG"), "color_mode": "L"})


def test_confound_probe_flags_class_explained_by_source_and_stays_quiet_otherwise():
    bad = confound.probe(_meta(True))
    assert bad["class_from_source"]["accuracy"] == 1.0 and bad["class_from_source"]["mostly_explained"]
    assert bad["metadata"]["all"]["accuracy"] > 0.95                     # the files say where they came from
    assert "**Class from source alone" in confound.section(bad)
    fine = confound.probe(_meta(False))
    assert fine["class_from_source"]["accuracy"] < 0.6 and not fine["class_from_source"]["mostly_explained"]
    assert "**Class from source" not in confound.section(fine)
    # within a class that has several sources, metadata still tells them apart (the shortcut a model can take)
    assert all(r["accuracy"] > 0.9 for r in fine["metadata"]["within_class"].values())


def test_site_augmentation_is_seeded_and_changes_scale_intensity_and_frame():
    from cxr.train.site_augment import augment_batch, epoch_rng, settings

    conf = settings({"enabled": True, "border_p": 1.0})
    x = np.tile(np.linspace(30, 220, 48, dtype=np.float32), (48, 1)).astype(np.uint8)[None].repeat(4, 0)
    a = augment_batch(x, epoch_rng(1, 0), conf)
    assert np.array_equal(a, augment_batch(x, epoch_rng(1, 0), conf))       # same seed, same pictures
    assert not np.array_equal(a, augment_batch(x, epoch_rng(1, 1), conf))   # next epoch, new ones
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(x[0], x[1])   # input untouched
    assert all(np.abs(a[i].astype(int) - x[i]).mean() > 2 for i in range(4))
    with pytest.raises(ValueError, match="unknown keys"):
        settings({"gama": 1})


# ----------------------------------------------------------------------------- end to end, real files
PER_CELL = 8


def _slice(src_root, dst_root, manifest_rows):
    """Copy PER_CELL files of every (class, source) cell of a shared folder, with its manifest rows."""
    picked = []
    for _, part in pd.DataFrame(manifest_rows).groupby(["class", "source"]):
        picked += part.sort_values("relative_path").head(PER_CELL).to_dict("records")
    for r in picked:
        (dst_root / r["relative_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / r["relative_path"], dst_root / r["relative_path"])
    with open(dst_root.parent / f"{dst_root.name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["relative_path", "sha256", "patient_id", "source", "class"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(picked)
    return picked


@pytest.fixture(scope="module")
def both_folders(spark, tmp_path_factory):
    """A slice of ../shared/data/cxr and cxr-adult, preprocessed in one run (two inputs, two manifests), and the
    recommended profile trained on it (1 epoch)."""
    base = tmp_path_factory.mktemp("sources")
    rows = {}
    for name in ("cxr", "cxr-adult"):
        root = shared_data(name)
        with open(root / "MANIFEST.csv", newline="") as fh:
            rows[name] = _slice(root, base / name, list(csv.DictReader(fh)))
    pre, models = base / "pre", base / "models"
    assert job("preprocess")(["--conf", "recommended", "--input", str(base / "cxr"), "--input", str(base / "cxr-adult"),
                              "--manifest", str(base / "cxr.csv"), "--manifest", str(base / "cxr-adult.csv"),
                              "--output", str(pre)]) == 0
    assert job("train")(["--conf", "recommended", "--data", str(pre), "--out", str(models), "--epochs", "1",
                         "--no-tracking"]) == 0
    return base, pre, models, rows


def test_preprocess_of_two_inputs_carries_each_manifest_source(both_folders):
    base, pre, _, rows = both_folders
    images = pq.read_table(pre / "images", columns=["sha256", "source", "label", "patient_id"]).to_pandas()
    expected = {r["sha256"]: r["source"] for name in rows for r in rows[name]}
    assert len(images) == len(expected)
    assert dict(zip(images["sha256"], images["source"])) == expected
    manifest = json.loads((pre / "manifest.json").read_text())
    cells = {(d["source"], d["label"]): d["count"] for d in manifest["by_source_and_label"]}
    assert cells == images.groupby(["source", "label"]).size().to_dict()
    assert manifest["counts"]["input"] == manifest["counts"]["written"]


def test_recommended_profile_writes_a_model_card_covered_by_the_model_id(both_folders):
    from cxr.models import card, store
    from cxr.score.frames import model_id

    _, pre, models, _ = both_folders
    d = models / "cnn-adam"
    c = card.read(d)
    train_rows = card.training_rows(str(pre))
    expected = train_rows[train_rows["label"].isin(CLASSES)].groupby(["label", "source"]).size()
    got = {(cls, s): v["images"] for cls, pop in c["population"].items() for s, v in pop["sources"].items()}
    assert got == expected.to_dict()
    assert c["sources"] == sorted({s for _, s in got}) and len(c["sources"]) == 4
    assert c["population"]["VIRAL"]["sources"]["kermany-guangzhou"]["population"] == "children aged 1-5"
    assert any(line.startswith("VIRAL: one source only") for line in c["limits"])
    assert c["by_source"] and c["evaluated_on"] == "test"            # the train job's evaluation added its numbers
    from cxr.config import load_config

    framing = load_config("recommended")["train"]["framing"]["p"]
    assert framing > 0 and c["framing"] == framing                   # the profile re-frames its films (docs/sources.md)
    assert store.read_metadata(d)["training"]["framing"]["p"] == framing
    assert f"framing augmentation p {framing:g}" in (d / "model_card.md").read_text()
    assert store.CARD_FILE in store.weight_files(d)
    before = model_id(d)
    (d / store.CARD_FILE).write_text(json.dumps({**c, "limits": []}))
    assert model_id(d) != before                                     # the card is part of the model id
    card.write(d, c)
    assert model_id(d) == before
    report = (models / "report.md").read_text()
    assert "Per source and class" in report and "Confound probe" in report and "Model card" in report


def test_score_warns_on_films_from_a_site_the_model_never_saw(both_folders, monkeypatch):
    base, _, models, _ = both_folders
    monkeypatch.setenv("CXR_PATIENT_KEY_SECRET", "site-test-secret")
    archive = base / "new-site"
    rng = np.random.default_rng(0)
    for i in range(4):
        write_dicom(archive / f"f{i}.dcm", rng.integers(0, 255, (128, 128)).astype(np.uint8), seed=100 + i,
                    extra=SITE)
    out = base / "preds"
    code = job("score")(["--input", str(archive), "--model", str(models / "cnn-adam"), "--output", str(out),
                         "--no-tracking", "--fail-on-drift", "--table-format", "parquet"])
    record = json.loads(next((out / "runs").glob("*.json")).read_text())
    key = HeaderReader(b"site-test-secret").read((archive / "f0.dcm").read_bytes()).columns["site_key"]
    assert record["sources"]["unseen"] == [site_source(key)]
    assert record["sources"]["counts"] == {site_source(key): record["counts"]["scored"]}
    assert any("never saw" in w for w in record["sources"]["warnings"])
    assert any(d.startswith("unseen source") for d in record["monitoring"]["drifted"])
    assert code == 4                                                  # --fail-on-drift
    predictions = pq.read_table(out / "predictions").to_pandas()
    assert (predictions["source"] == site_source(key)).all()
    page = (out / "reports" / f"{record['run_id']}.html").read_text()
    assert "never seen in training" in page and "VIRAL: one source only" in page   # counts and the card's limits
    # the same model on films of a source it was trained on: no warning
    seen = base / "seen"
    shutil.copytree(base / "cxr-adult" / "NORMAL", seen)
    out2 = base / "preds2"
    assert job("score")(["--input", str(seen), "--model", str(models / "cnn-adam"), "--output", str(out2),
                         "--no-tracking", "--source", "rsna-nih", "--table-format", "parquet"]) == 0
    record2 = json.loads(next((out2 / "runs").glob("*.json")).read_text())
    assert record2["sources"]["unseen"] == [] and record2["sources"]["counts"] == {"rsna-nih": PER_CELL}


def test_evaluate_external_archive_reports_beside_the_estimate_with_intervals(both_folders, tmp_path):
    """Films of both shared folders the slice did not use, as a raw archive of 'another site': preprocessed with
    the model's params, every labelled image evaluated, per source, with intervals."""
    base, _, models, rows = both_folders
    used = {r["relative_path"] for r in rows["cxr-adult"]}
    root = shared_data("cxr-adult")
    with open(root / "MANIFEST.csv", newline="") as fh:
        unused = [r for r in csv.DictReader(fh) if r["relative_path"] not in used]
    archive = tmp_path / "site"
    picked = _slice(root, archive, unused)
    out = tmp_path / "external"
    assert job("evaluate")(["--models", str(models), "--external", str(archive), "--manifest",
                            str(tmp_path / "site.csv"), "--external-out", str(out)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    s = evaluation["models"]["cnn-adam"]
    assert s["n"] == len(picked) == evaluation["data"]["images"]
    cells = {(r["source"], r["class"]): r["n"] for r in s["by_source"]}
    assert cells == pd.DataFrame(picked).groupby(["source", "class"]).size().to_dict()
    md = (out / "external.md").read_text()
    assert "## cnn-adam" in md and "recall NORMAL" in md and "per source and class" in md and "[" in md
    pre = json.loads((out / "preprocessed" / "manifest.json").read_text())
    assert pre["params"]["size"] == 96 and pre["params"]["resize_mode"] == "pad"   # the model's own image steps


def test_framing_probe_reproduces_the_job_as_filed_and_scores_every_shape(both_folders, tmp_path, capsys):
    """scripts/framing_probe.py on the trained slice: the films as filed, decoded from their raw files, reach the
    recall the model gives the preprocess job's own images (Keras on the Parquet images: an independent path);
    every (source, class) of the held-out films has a row per framing."""
    import importlib.util

    import pyarrow.dataset as pads

    from cxr.models import store
    from cxr.score.frames import predict_fixed_batches

    _, pre, models, _ = both_folders
    spec = importlib.util.spec_from_file_location("framing_probe", "scripts/framing_probe.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "framing.json"
    assert script.main(["--data", str(pre), "--split", "train", "--json", str(out), f"m={models / 'cnn-adam'}"]) == 0
    assert "| landscape 1.22 |" in capsys.readouterr().out
    rows = pd.DataFrame(json.loads(out.read_text())["m"])
    table = pads.dataset(f"{pre}/images", format="parquet", partitioning="hive").to_table().to_pandas()
    table = table[table["split"] == "train"]
    cells = table.groupby(["source", "label"]).size()
    assert len(rows) == len(cells) * 4 and set(rows["framing"]) == {"as filed", "portrait 0.82", "square",
                                                                    "landscape 1.22"}
    predictor = store.load_predictor(models / "cnn-adam", engine="keras")
    x = np.stack([np.frombuffer(b, np.uint8).reshape(int(h), int(w))
                  for b, h, w in zip(table["image"], table["height"], table["width"])])
    called = np.asarray(CLASSES)[predict_fixed_batches(predictor, x, 32)[0].argmax(axis=1)]
    as_filed = rows[rows["framing"] == "as filed"].set_index(["source", "class"])
    for (source, label), n in cells.items():
        sel = ((table["source"] == source) & (table["label"] == label)).to_numpy()
        assert as_filed.loc[(source, label), "films"] == n
        assert as_filed.loc[(source, label), "recall"] == pytest.approx((called[sel] == label).mean(), abs=1e-9)


def test_row_weights_reach_the_keras_loss(pre_out):
    """Per-row weights (balanced_by_source) weigh each row's cross-entropy in the fit, class weights ignored:
    the reported loss of a frozen model equals the weighted mean computed in NumPy on its own predictions."""
    import keras

    from cxr.data.loader import load_split
    from cxr.data.stream import ParquetSplit
    from cxr.train import set_seeds
    from cxr.train.keras_fit import train_keras
    from tests.train_data import TINY_CNN

    train = ParquetSplit.open(str(pre_out), "train", buffer=10_000, batch_rows=5)
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(train)).astype(np.float32)
    set_seeds(42)
    frozen = {**TINY_CNN, "optimizer_config": {"adam": {"learning_rate": 0.0}}}
    model, history, _, _ = train_keras({"name": "cnn-adam", "family": "cnn", "optimizer": "adam"}, train,
                                       train.subset(np.zeros(len(train), bool)), frozen,
                                       {"COVID": 9.0, "NORMAL": 9.0, "VIRAL": 9.0}, 1, 42, row_weights=w)
    memory = load_split(str(pre_out), "train")
    p = model.predict(memory.x, batch_size=64, verbose=0).astype(np.float64)
    ce = -np.log(p[np.arange(len(p)), memory.y])
    assert history["loss"][0] == pytest.approx(float((w * ce).mean()), rel=1e-4)
    keras.backend.clear_session()
