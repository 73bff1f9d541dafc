"""Save/load round trip, and refusal of model directories that do not add up."""

import json

import numpy as np
import pytest

from cxr.nn import ModelFormatError, cnn, load, save
from cxr.nn.io import ARCH_FILE, WEIGHTS_FILE


@pytest.fixture
def saved(tmp_path):
    net = cnn((10, 10, 1), 3, filters=4, hidden=8, seed=11)
    x = np.random.default_rng(0).random((5, 10, 10, 1), dtype=np.float32)
    net.train(x, [0, 1, 2, 1, 0], epochs=2, batch_size=2, seed=0)  # weights no longer the initial ones
    d = save(net, tmp_path / "model", metadata={"classes": ["a", "b", "c"]})
    return net, x, d


def test_round_trip_gives_identical_predictions(saved):
    net, x, d = saved
    assert sorted(p.name for p in d.iterdir()) == [ARCH_FILE, WEIGHTS_FILE]
    back = load(d)
    assert [type(a) for a in back.layers] == [type(b) for b in net.layers]
    assert [repr(a) for a in back.layers] == [repr(b) for b in net.layers]
    for a, b in zip(back.get_weights(), net.get_weights()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(back.predict_proba(x), net.predict_proba(x))
    assert back.metadata == {"classes": ["a", "b", "c"]}
    with np.load(d / WEIGHTS_FILE, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)


def _edit_json(d, edit):
    arch = json.loads((d / ARCH_FILE).read_text())
    edit(arch)
    (d / ARCH_FILE).write_text(json.dumps(arch))


def test_unknown_layer_type_is_refused(saved):
    _, _, d = saved
    _edit_json(d, lambda a: a["layers"][2].update(type="Lambda"))
    with pytest.raises(ModelFormatError, match=r"layers\[2\] has unknown layer type 'Lambda'; known types: .*Conv2D"):
        load(d)


def test_declared_shape_that_disagrees_with_config_is_refused(saved):
    _, _, d = saved
    _edit_json(d, lambda a: a["layers"][0]["weights"].update(kernel=[3, 3, 1, 5]))
    with pytest.raises(ModelFormatError, match=r"layers\[0\] \(Conv2D\) declares weights"):
        load(d)


def test_config_change_that_no_longer_matches_weights_is_refused(saved):
    _, _, d = saved

    def grow(a):
        a["layers"][4]["config"]["units"] = 9
        a["layers"][4]["weights"] = {"kernel": [64, 9], "bias": [9]}
    _edit_json(d, grow)
    with pytest.raises(ModelFormatError, match="(shape|declares)"):
        load(d)


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.update(format="keras"), "not a cxr.nn model"),
    (lambda a: a.update(version=99), "unsupported version"),
    (lambda a: a.update(dtype="object"), "dtype must be"),
    (lambda a: a.update(input_shape=[10, -1, 1]), "input_shape"),
    (lambda a: a["layers"][0]["config"].update(padding="full"), "invalid config"),
    (lambda a: a["layers"][0]["config"].update(evil=1), "invalid config"),
    (lambda a: a.update(layers=[]), "non-empty"),
])
def test_malformed_architecture_is_refused(saved, edit, message):
    _, _, d = saved
    _edit_json(d, edit)
    with pytest.raises(ModelFormatError, match=message):
        load(d)


def test_weights_that_do_not_match_are_refused(saved):
    net, _, d = saved
    with np.load(d / WEIGHTS_FILE) as npz:
        arrays = dict(npz)
    key = next(iter(arrays))
    np.savez(d / WEIGHTS_FILE, **{**arrays, key: arrays[key][..., :1]})
    with pytest.raises(ModelFormatError, match="has shape"):
        load(d)
    np.savez(d / WEIGHTS_FILE, **{k: v for k, v in arrays.items() if k != key})
    with pytest.raises(ModelFormatError, match="missing"):
        load(d)
    np.savez(d / WEIGHTS_FILE, **arrays, extra=np.zeros(1))
    with pytest.raises(ModelFormatError, match="unexpected"):
        load(d)
    np.savez(d / WEIGHTS_FILE, **{**arrays, key: np.full(arrays[key].shape, np.nan, np.float32)})
    with pytest.raises(ModelFormatError, match="NaN"):
        load(d)


def test_pickled_or_garbage_weights_are_refused(saved):
    _, _, d = saved
    with np.load(d / WEIGHTS_FILE) as npz:
        arrays = dict(npz)
    key = next(iter(arrays))
    obj = np.empty(arrays[key].shape, dtype=object)
    np.savez(d / WEIGHTS_FILE, **{**arrays, key: obj})  # an object array is stored as a pickle
    with pytest.raises(ModelFormatError, match="cannot read weights"):
        load(d)
    (d / WEIGHTS_FILE).write_bytes(b"not a zip file at all")
    with pytest.raises(ModelFormatError, match="cannot read weights"):
        load(d)


def test_missing_files_and_bad_json(tmp_path, saved):
    _, _, d = saved
    with pytest.raises(ModelFormatError, match="missing"):
        load(tmp_path / "nowhere")
    (d / ARCH_FILE).write_text("{ not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load(d)
