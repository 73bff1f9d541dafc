import pytest

from cxr.config import load_config
from cxr.common.labels import alias_table, infer_label
from cxr.common.splits import assign_split, validate_ratios


@pytest.fixture(scope="module")
def aliases():
    return alias_table(load_config()["preprocess"]["labels"])


@pytest.mark.parametrize("rel, expected", [
    ("COVID/a.png", "COVID"),
    ("NORMAL/b.jpg", "NORMAL"),
    ("VIRAL/c.jpeg", "VIRAL"),
    ("COVID_IEEE/covid/x.png", "COVID"),          # the study's Kaggle set
    ("COVID_IEEE/normal/x.png", "NORMAL"),
    ("COVID_IEEE/virus/x.png", "VIRAL"),
    ("train/COVID19/x.jpg", "COVID"),             # COVID19 / PNEUMONIA / NORMAL under train/ and test/
    ("test/PNEUMONIA/x.jpg", "VIRAL"),
    ("test/NORMAL/x.jpg", "NORMAL"),
    ("Viral Pneumonia/images/x.png", "VIRAL"),    # images/ beside masks/
    ("COVID-19/images/x.png", "COVID"),
    ("hospital_a/2024/covid-19/x.png", "COVID"),
    ("viral_pneumonia/x.png", "VIRAL"),
    ("scan.png", None),                           # unlabelled archives are valid
    ("archive/2024/scan.png", None),
])
def test_label_from_class_folder(aliases, rel, expected):
    assert infer_label(rel, aliases) == expected


def test_deepest_class_folder_wins(aliases):
    assert infer_label("NORMAL/covid/x.png", aliases) == "COVID"


def test_conflicting_alias_is_refused():
    with pytest.raises(ValueError, match="both"):
        alias_table({"COVID": ["x"], "VIRAL": ["X"]})


def test_split_is_deterministic_and_close_to_ratios():
    ratios = validate_ratios({"train": 0.8, "val": 0.1, "test": 0.1})
    splits = [assign_split(f"patient-{i}", ratios, 42) for i in range(20000)]
    assert splits == [assign_split(f"patient-{i}", ratios, 42) for i in range(20000)]
    share = {name: splits.count(name) / len(splits) for name in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.015 and abs(share["val"] - 0.1) < 0.01
    other_seed = [assign_split(f"patient-{i}", ratios, 7) for i in range(2000)]
    assert other_seed != splits[:2000]


def test_bad_ratios_are_refused():
    with pytest.raises(ValueError):
        validate_ratios({"train": 0.9, "val": 0.2, "test": 0.1})


def test_config_layers_and_overrides(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("preprocess:\n  size: 64\n  brightness:\n    beta: 0\n")
    conf = load_config(profile, {"preprocess.clip_limit": 3.0, "preprocess.tile_grid": None})
    assert conf["preprocess"]["size"] == 64
    assert conf["preprocess"]["brightness"] == {"alpha": 1.0, "beta": 0}
    assert conf["preprocess"]["clip_limit"] == 3.0
    assert conf["preprocess"]["tile_grid"] == 8
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
