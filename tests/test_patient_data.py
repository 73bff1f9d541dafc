"""No patient data where it does not belong: DICOMs carrying planted names, birth dates, addresses, physicians,
free text and MRNs go through the real jobs (preprocess, train with MLflow tracking, score with Grad-CAM), and
not one of those values may appear in any file the run wrote, in the MLflow store or in the jobs' console output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cxr.quality.dicom_files import planted_phi, write_dicom
from cxr.datasets.synth import render_chest
from tests.conftest import load_job as job

SIZE = 32
SECRET = "phi-test-secret-4b1d"
PER_CLASS = 10


def _archive(root: Path) -> list[dict]:
    """Frontal films in class folders plus a lateral, a CT and a report without pixels, and a truncated file: every
    one with its own planted patient data."""
    phis, n = [], 0
    for folder in ("COVID", "NORMAL", "VIRAL"):
        for i in range(PER_CLASS):
            pixels = np.clip(np.round(render_chest(folder, size=80, rng=n) * 255), 0, 255).astype(np.uint8)
            phi = planted_phi(n)
            write_dicom(root / folder / f"img{n:03d}.dcm", pixels, seed=n, phi=phi, view="PA" if i % 2 else "AP")
            phis.append(phi)
            n += 1
    odd = [("lateral", {"view": "LL"}), ("ct", {"modality": "CT", "view": None}),
           ("report", {"modality": "SR", "body_part": None, "view": None, "pixels": None})]
    for name, kwargs in odd:
        kwargs = dict(kwargs)
        pixels = kwargs.pop("pixels", np.full((80, 80), 90, np.uint8) + np.eye(80, dtype=np.uint8) * 60)
        phi = planted_phi(n)
        write_dicom(root / "NORMAL" / f"{name}.dcm", pixels, seed=n, phi=phi, **kwargs)
        phis.append(phi)
        n += 1
    cut = root / "VIRAL" / "cut.dcm"   # an errors row: its header still holds patient data
    phi = planted_phi(n)
    write_dicom(cut, np.full((80, 80), 100, np.uint8), seed=n, phi=phi)
    cut.write_bytes(cut.read_bytes()[:-3000])
    phis.append(phi)
    return phis


def _texts(path: Path):
    """(file, text) for every file under path: Parquet tables as their non-binary values, others as raw bytes."""
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.suffix == ".parquet":
            table = pq.read_table(f)
            cols = [c for c, t in zip(table.column_names, table.schema.types) if str(t) != "binary"]
            yield f, "\n".join(str(v) for c in cols for v in table.column(c).to_pylist())
        else:
            yield f, f.read_bytes().decode("latin-1")


@pytest.fixture(scope="module")
def run_everything(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("phi")
    archive, outputs = base / "archive", base / "outputs"
    phis = _archive(archive)
    conf = base / "small.yaml"
    conf.write_text(yaml.safe_dump({"preprocess": {"size": SIZE}, "score": {"batch_size": 8},
                                    "train": {"verbose": 0, "batch_size": 8},
                                    "tracking": {"model_cache": str(outputs / "cache")}}))
    store = f"sqlite:///{outputs}/mlflow/mlflow.db"
    (outputs / "mlflow").mkdir(parents=True)
    return base, archive, outputs, conf, store, phis


def test_planted_patient_data_reaches_no_output_store_or_log(run_everything, capfd, monkeypatch):
    base, archive, outputs, conf, store, phis = run_everything
    monkeypatch.setenv("CXR_PATIENT_KEY_SECRET", SECRET)
    monkeypatch.chdir(outputs)   # anything a job writes to its working directory is an output too
    pre, models, preds = outputs / "pre", outputs / "models", outputs / "preds"
    common = ["--conf", str(conf), "--log-level", "DEBUG"]
    assert job("preprocess")([*common, "--input", str(archive), "--output", str(pre)]) == 0
    assert job("train")([*common, "--data", str(pre), "--out", str(models), "--models", "cnn", "--optimizers", "adam",
                         "--epochs", "1", "--tracking-uri", store]) == 0
    assert job("score")([*common, "--input", str(archive), "--model", str(models / "cnn-adam"), "--output",
                         str(preds), "--tracking-uri", store, "--explain", "1"]) == 0
    console = capfd.readouterr()
    texts = list(_texts(outputs)) + [(Path("stdout"), console.out), (Path("stderr"), console.err)]

    # train and evaluate read OUT/images only: the out-of-scope files never reach them
    assert pq.read_table(pre / "images").num_rows == 3 * PER_CLASS
    assert pq.read_table(pre / "out_of_scope").num_rows == 3 and pq.read_table(pre / "errors").num_rows == 1
    predictions = pq.read_table(preds / "predictions").to_pandas()
    assert len(predictions) == 3 * PER_CLASS and predictions["sop_instance_uid"].notna().all()
    assert predictions["patient_key"].notna().all()
    assert len(pq.read_table(preds / "out_of_scope").to_pandas()) == 3
    assert len(pq.read_table(preds / "errors").to_pandas()) == 1
    everything = "\n".join(t for _, t in texts)
    assert predictions["sop_instance_uid"].iloc[0] in everything   # the search does see what the tables hold
    leaks = [(str(f.relative_to(outputs)) if f.is_absolute() else str(f), tag, value)
             for phi in phis for tag, value in phi.items() for f, text in texts if value in text]
    leaks += [(str(f), "secret", SECRET) for f, text in texts if SECRET in text]
    assert not leaks, f"patient data found: {leaks[:10]} ({len(leaks)} in all)"
    assert len(texts) > 50   # parquet parts, model files, run records, Grad-CAM pictures, the MLflow store
