"""The framing probe and the framing augmentation (issue 30: a class known by the shape of its films)."""
from __future__ import annotations

import numpy as np
import pytest

from cxr.evaluate.framing import FRAMINGS, framed_images, recall_table
from cxr.image.enhance import centre_cut, resize_square
from cxr.image.pipeline import PreprocessParams
from cxr.train.site_augment import _content_box, augment_batch, epoch_rng, framing_settings, reframe, settings


def _film(h, w):
    """A film with structure everywhere (no constant row or column), so bands are only what pad adds."""
    y, x = np.mgrid[0:h, 0:w]
    return (40 + (x * 7 + y * 3) % 170 + (x % 5)).astype(np.uint8)


@pytest.mark.parametrize("h,w,aspect,want", [(100, 100, 1.25, (80, 100)), (100, 100, 0.8, (100, 80)),
                                             (80, 120, 1.0, (80, 80)), (120, 80, 1.0, (80, 80)),
                                             (100, 100, 1.0, (100, 100))])
def test_centre_cut_only_cuts_at_the_centre(h, w, aspect, want):
    film = _film(h, w)
    cut = centre_cut(film, aspect)
    assert cut.shape == want
    top, left = (h - want[0]) // 2, (w - want[1]) // 2
    assert np.array_equal(cut, film[top:top + want[0], left:left + want[1]])


def test_reframe_gives_a_square_film_the_bands_of_another_shape():
    square = resize_square(_film(200, 200), 96, "pad")
    assert _content_box(square) == (0, 96, 0, 96)
    landscape = reframe(square, 1.25)
    top, bottom, left, right = _content_box(landscape)
    assert (left, right) == (0, 96) and 8 <= top <= 10 and 86 <= bottom <= 88   # 96 / 1.25 = 77 rows of film
    assert landscape.shape == square.shape and landscape.dtype == np.uint8
    portrait = reframe(landscape, 0.8)    # the landscape film's bands come off first, then its sides are cut
    top, bottom, left, right = _content_box(portrait)
    assert (top, bottom) == (0, 96) and 8 <= left <= 10 and 86 <= right <= 88
    assert np.array_equal(reframe(square, 1.0), square)   # a film's own shape: unchanged


def test_framing_augmentation_is_off_by_default_seeded_and_runs_without_the_site_augmentation():
    x = resize_square(_film(120, 150), 64, "pad")[None].repeat(6, 0)
    site_off = settings(None)
    assert np.array_equal(augment_batch(x, epoch_rng(3, 0), site_off, framing_settings(None)), x)   # p 0: off
    framing = framing_settings({"p": 1.0})
    a = augment_batch(x, epoch_rng(3, 0), site_off, framing)
    assert np.array_equal(a, augment_batch(x, epoch_rng(3, 0), site_off, framing))
    assert len({_content_box(im) for im in a}) >= 3   # six copies of one film, framed several ways
    for im in a:   # only re-framed: each is the film cut to some shape and padded back, nothing else changed
        top, bottom, left, right = _content_box(im)
        assert 0.78 <= (right - left) / (bottom - top) <= 1.28
    # the site augmentation's own draws are unchanged by a framing switched off (earlier runs reproduce)
    site_on = settings({"enabled": True})
    assert np.array_equal(augment_batch(x, epoch_rng(5, 0), site_on), augment_batch(x, epoch_rng(5, 0), site_on,
                                                                                    framing_settings({"p": 0.0})))
    with pytest.raises(ValueError, match="unknown keys"):
        framing_settings({"prob": 0.5})


def test_recall_table_equals_a_hand_count():
    labels = ["COVID", "COVID", "NORMAL", "NORMAL", "NORMAL"]
    sources = ["a", "a", "b", "b", "c"]
    calls = {"as filed": np.array(["COVID", "NORMAL", "NORMAL", "NORMAL", "COVID"]),
             "square": np.array(["COVID", "COVID", "COVID", "NORMAL", "NORMAL"])}
    t = recall_table(labels, sources, calls).set_index(["source", "class", "framing"])
    assert t.loc[("a", "COVID", "as filed"), "recall"] == 0.5
    assert t.loc[("a", "COVID", "square"), "recall"] == 1.0
    assert t.loc[("b", "NORMAL", "square"), "recall"] == 0.5
    assert t.loc[("b", "NORMAL", "square"), "called COVID"] == 0.5
    assert t.loc[("c", "NORMAL", "as filed"), "recall"] == 0.0 and t.loc[("c", "NORMAL", "square"), "films"] == 1
    assert len(t) == 3 * 2


def test_framed_images_are_the_model_inputs_of_each_shape():
    params = PreprocessParams(size=32, resize_mode="pad")
    out = framed_images([_film(90, 120), _film(100, 100)], params)
    assert set(out) == set(FRAMINGS)
    for name, x in out.items():
        assert x.shape == (2, 32, 32) and x.dtype == np.uint8
    # the square film as filed and cut square are the same image; cut landscape it gains bands
    assert np.array_equal(out["as filed"][1], out["square"][1])
    assert _content_box(out["landscape 1.22"][1])[0] > 0


def test_the_other_probes_change_only_what_they_name():
    """A frame is the film with its outer bands set black (or white); the 224 px variant only shrinks, keeps the
    shape, and leaves a small film alone."""
    from cxr.evaluate.framing import PROBES, at_most, framed, marked

    film = _film(100, 150).astype(np.uint16) * 200
    black = framed(film, 0.08, False)
    assert black.dtype == film.dtype and black.shape == film.shape
    assert (black[:8] == 0).all() and (black[-8:] == 0).all() and (black[:, :12] == 0).all()
    assert (black[:, -12:] == 0).all() and np.array_equal(black[8:-8, 12:-12], film[8:-8, 12:-12])
    white = framed(film, 0.08, True)
    assert (white[:8] == 65535).all() and np.array_equal(white[8:-8, 12:-12], film[8:-8, 12:-12])
    assert np.array_equal(framed(film, 0.0, False), film)
    small = at_most(_film(400, 600), 224)
    assert small.shape == (149, 224)
    assert at_most(_film(100, 150), 224).shape == (100, 150)
    params = PreprocessParams(size=32, resize_mode="pad")
    for name, variants in PROBES.items():
        out = framed_images([_film(90, 120)], params, variants)
        assert set(out) == set(variants) and "as filed" in out
        assert all(x.shape == (1, 32, 32) and x.dtype == np.uint8 for x in out.values())
    out = framed_images([_film(90, 120)], params, PROBES["frames"])
    assert not np.array_equal(out["black frame 8%"], out["as filed"])
    text = marked(np.zeros((400, 300), np.uint8), "R", "top left", 0.05)
    ys, xs = np.nonzero(text)
    assert text.max() == 255 and ys.max() < 60 and xs.max() < 60   # white letters, in the top left corner only
