"""Out-of-scope test material the project makes itself (no downloads): what a chest X-ray model must not be
asked about, each file in a folder named by its kind, with a MANIFEST.csv.

Why: the scope gate (cxr.scope.rules) and the out-of-distribution distance (cxr.scope.ood) must be measured on
files that are not frontal chest radiographs, and a hospital's real CT, hand films or holiday photos cannot be
shipped. Five groups:

  a  pydicom_ct_mr_sc     pydicom's bundled CT, MR and secondary-capture test files that the pipeline decodes
                          (at its 64 px min_side), copied as they are: the header rules should stop them
  b  tagless_png          the same pixels (one per distinct picture) as PNGs without any tag: an archive whose
                          tags were lost; only the distance can speak for them
  c  dicom_*              real chest X-ray pixels (../shared/data/cxr; cxr.datasets.synth chests when absent) written by
                          cxr.quality.dicom_files.write_dicom with out-of-scope tags: lateral (ViewPosition LL),
                          BodyPartExamined HAND / PELVIS / KNEE, Modality CT, 3 frames, and an SR without pixels
  d  mnist_digits         MNIST test digits (../shared/data/mnist) upscaled to 256 px PNGs
  e  rendered_*           seeded pictures that are no X-ray: shapes, gradients, text, noise textures ("photos"),
                          256-512 px, PNG or JPEG, colour or gray
  f  reframed_*           held-out real frontal films (the VAL and TEST splits of ../shared/data/cxr and
                          cxr-adult, cxr.scope.frontal_data) re-framed so that they stop being frontal chest films
                          (cxr.scope.negatives): rotated 90 or 180 degrees, one side mirrored, one lung, the lungs
                          cut away, a lateral-like strip, a corner zoom; PNG without tags
  g  radiograph_*         rendered radiographs of other body parts (limb, hand, pelvis, skull or spine) and CT-like
                          slices (cxr.scope.negatives, this module's seed; the frontal check trains on other seeds)

Every file is the same on every run with the same arguments (seeded; DICOM UIDs derived from the seed).

    python -m cxr.quality.out_of_scope OUT [--cxr ../shared/data/cxr] [--mnist ../shared/data/mnist]
"""
from __future__ import annotations

import argparse
import csv
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from cxr.quality.dicom_files import write_dicom
from cxr.scope.negatives import REFRAMINGS, RENDERED, render_picture

MANIFEST = "MANIFEST.csv"
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"     # Secondary Capture Image Storage (and its multi-frame kinds)
PYDICOM_MODALITIES = ("CT", "MR", "OT")
MIN_SIDE = 64                                    # preprocess.min_side: smaller files are decoder rejections
CHEST_SIDE = 512                                 # long side of the chest pixels written into the tagged DICOMs


@dataclass(frozen=True)
class Kind:
    group: str          # a..e as in the module docstring
    catch: str          # what should catch it: "header" (DICOM rules) or "ood" (only the distance can)
    words: str | None   # words the scope gate's reason must hold (header kinds); None: any reason
    tags: Mapping | None = None     # write_dicom keyword arguments (group c)


KINDS: dict[str, Kind] = {
    "pydicom_ct_mr_sc": Kind("a", "header", "not a radiograph"),
    "tagless_png": Kind("b", "ood", None),
    "dicom_lateral": Kind("c", "header", "ViewPosition LL: lateral view", {"modality": "DX", "view": "LL"}),
    "dicom_hand": Kind("c", "header", "BodyPartExamined HAND", {"modality": "CR", "body_part": "HAND"}),
    "dicom_pelvis": Kind("c", "header", "BodyPartExamined PELVIS", {"modality": "CR", "body_part": "PELVIS",
                                                                     "view": "AP"}),
    "dicom_knee": Kind("c", "header", "BodyPartExamined KNEE", {"modality": "DX", "body_part": "KNEE",
                                                                 "view": "AP"}),
    "dicom_ct": Kind("c", "header", "Modality CT", {"modality": "CT", "view": None}),
    "dicom_multiframe": Kind("c", "header", "NumberOfFrames 3", {"modality": "DX", "frames": 3}),
    "dicom_sr_no_pixels": Kind("c", "header", "no pixel data", {"modality": "SR", "body_part": None,
                                                                  "view": None}),
    "mnist_digits": Kind("d", "ood", None),
    "rendered_shapes": Kind("e", "ood", None),
    "rendered_gradients": Kind("e", "ood", None),
    "rendered_text": Kind("e", "ood", None),
    "rendered_textures": Kind("e", "ood", None),
    **{f"reframed_{k}": Kind("f", "ood", None) for k in REFRAMINGS},
    **{f"radiograph_{k.removeprefix('rendered_')}": Kind("g", "ood", None) for k in RENDERED},
}
DEFAULT_COUNTS = {**{k: 10 for k in KINDS if KINDS[k].group == "c"}, "mnist_digits": 100,
                  **{k: 25 for k in KINDS if KINDS[k].group == "e"},
                  **{k: 20 for k in KINDS if KINDS[k].group in ("f", "g")}}   # a and b: every usable pydicom file


# ---------------------------------------------------------------------------------------------- a, b
def pydicom_sources() -> list[tuple[str, bytes, np.ndarray]]:
    """(name, bytes, decoded gray pixels) of pydicom's bundled CT / MR / secondary-capture files that the
    pipeline's decoder accepts at its min_side, sorted by name (no network: the files ship with pydicom)."""
    from pydicom.data import get_testdata_file

    from cxr.image.decode import decode_image
    from cxr.image.rejection import RejectedImage
    from cxr.scope.dicom_header import HeaderReader

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    reader, out = HeaderReader(None), []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # pydicom's own malformed samples (badVR.dcm, ...)
            header = reader.read(data)
        if header is None or not header.has_pixels:
            continue
        cols = header.columns
        if (cols["modality"] or "") not in PYDICOM_MODALITIES and not (cols["sop_class_uid"] or "").startswith(
                SC_SOP_PREFIX):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = decode_image(data, min_side=MIN_SIDE).pixels
        except RejectedImage:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", "_".join(path.relative_to(folder).with_suffix("").parts))
        out.append((name, data, pixels))
    return out


# ---------------------------------------------------------------------------------------------- c
def chest_pixels(n: int, cxr_dir: str | Path | None, seed: int) -> list[tuple[str, np.ndarray]]:
    """n (name, uint8 gray) frontal chest radiographs at most CHEST_SIDE px: a seeded pick of cxr_dir's files,
    or cxr.datasets.synth chests when cxr_dir is None or absent."""
    from cxr.image.decode import decode_image

    rng = np.random.default_rng([seed, 3])
    if cxr_dir is not None and Path(cxr_dir).is_dir():
        files = sorted(p for p in Path(cxr_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        out = []
        for i in rng.choice(len(files), size=min(n, len(files)), replace=False):
            img = decode_image(files[i].read_bytes()).pixels
            img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else img
            scale = CHEST_SIDE / max(img.shape)
            if scale < 1:
                img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                                 interpolation=cv2.INTER_AREA)
            out.append((files[i].stem, np.ascontiguousarray(img)))
        return out
    from cxr.datasets.synth import CLASSES, render_chest

    return [(f"synth{i}", np.round(render_chest(CLASSES[i % 3], CHEST_SIDE, rng) * 255).astype(np.uint8))
            for i in range(n)]


# ---------------------------------------------------------------------------------------------- d
def mnist_digits(n: int, mnist_dir: str | Path, seed: int) -> list[tuple[str, np.ndarray]]:
    """n MNIST test digits (digit i % 10 for the i-th), upscaled to 256 px."""
    from cxr.datasets.mnist import load_mnist

    images, labels = load_mnist(mnist_dir, "test")
    rng = np.random.default_rng([seed, 4])
    out = []
    for i in range(n):
        idx = int(rng.choice(np.flatnonzero(labels == i % 10)))
        out.append((f"digit{i % 10}-t10k{idx:05d}", cv2.resize(images[idx], (256, 256), interpolation=cv2.INTER_CUBIC)))
    return out


# ---------------------------------------------------------------------------------------------- e
# render_picture: cxr.scope.negatives (the frontal check trains on it with other seeds)


# ---------------------------------------------------------------------------------------------- f
def heldout_reframings(shared: Path, counts: Mapping[str, int], seed: int) -> list[tuple[str, str, np.ndarray, str]]:
    """(kind, file name, gray uint8, source) of held-out films (val and test splits of both shared folders, as
    the preprocess job splits them) re-framed: film i of a seeded order goes to kind i % kinds, so no film is
    used twice within a kind and the kinds draw on different films where there are enough."""
    from cxr.scope.frontal_data import decode_film, heldout_films

    films = heldout_films(shared)
    rng = np.random.default_rng([seed, 6])
    order = rng.permutation(len(films))
    kinds = [k for k in KINDS if KINDS[k].group == "f" and counts.get(k, 0) > 0]
    out = []
    for ki, kind in enumerate(kinds):
        make = REFRAMINGS[kind.removeprefix("reframed_")]
        for i in range(counts[kind]):
            path, folder, split = films[order[(ki + i * len(kinds)) % len(films)]]
            img = make(decode_film((shared / path).read_bytes(), CHEST_SIDE), rng)
            if min(img.shape) < 2 * MIN_SIDE:   # a strip of a small film: enlarged so the decoder takes it
                scale = 2 * MIN_SIDE / min(img.shape)
                img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                                 interpolation=cv2.INTER_CUBIC)
            out.append((kind, f"{kind}_{i:03d}.png", img, f"{split} film {path}, {kind.removeprefix('reframed_')}"))
    return out


# ---------------------------------------------------------------------------------------------- writing
SAME_PICTURE = 0.03     # mean |difference| of two 32 px min-max-scaled thumbnails below which they are one picture


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    t = cv2.resize(pixels.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _png(path: Path, img: np.ndarray, ext: str = ".png") -> tuple[int, int]:
    ok, data = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return img.shape[0], img.shape[1]


def write_material(out: str | Path, *, cxr_dir: str | Path | None = None, mnist_dir: str | Path | None = None,
                   counts: Mapping[str, int] | None = None, seed: int = 0, overwrite: bool = True,
                   shared_dir: str | Path | None = None) -> list[dict]:
    """Write every kind under out/KIND/ and out/MANIFEST.csv; return the manifest rows (relative_path, kind,
    group, catch, expected_words, format, height, width, source). counts: files per kind for groups c-g
    (DEFAULT_COUNTS for the kinds not given; 0 leaves a kind out); groups a and b take every usable pydicom
    file. mnist_digits is left out when mnist_dir is None or absent, group f when shared_dir (the folder of
    cxr/ and cxr-adult/) is None or absent."""
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    rows: list[dict] = []

    def add(kind: str, name: str, fmt: str, shape, source: str) -> None:
        rows.append({"relative_path": f"{kind}/{name}", "kind": kind, "group": KINDS[kind].group,
                     "catch": KINDS[kind].catch, "expected_words": KINDS[kind].words or "", "format": fmt,
                     "height": shape[0] if shape else "", "width": shape[1] if shape else "", "source": source})

    seen: list[np.ndarray] = []
    for name, data, pixels in pydicom_sources():                                        # a, b
        (out / "pydicom_ct_mr_sc").mkdir(parents=True, exist_ok=True)
        (out / "pydicom_ct_mr_sc" / f"pydicom_ct_mr_sc_{name}.dcm").write_bytes(data)
        add("pydicom_ct_mr_sc", f"pydicom_ct_mr_sc_{name}.dcm", "DICOM", pixels.shape, f"pydicom test file {name}")
        thumb = _thumbnail(pixels)
        if not any(np.abs(thumb - t).mean() < SAME_PICTURE for t in seen):   # MR_small in 8 encodings: one PNG
            seen.append(thumb)
            shape = _png(out / "tagless_png" / f"tagless_png_{name}.png", pixels)
            add("tagless_png", f"tagless_png_{name}.png", "PNG", shape, f"pixels of pydicom test file {name}")

    tagged = [k for k in KINDS if KINDS[k].group == "c" and counts.get(k, 0) > 0]     # c
    chests = chest_pixels(max((counts[k] for k in tagged), default=0), cxr_dir, seed)
    for ki, kind in enumerate(tagged):
        tags = dict(KINDS[kind].tags)
        for i, (stem, pixels) in enumerate(chests[:counts[kind]]):
            name = f"{kind}_{i:03d}.dcm"
            px = None if tags.get("modality") == "SR" else pixels
            write_dicom(out / kind / name, px, seed=seed * 100_000 + ki * 1000 + i, **tags)
            add(kind, name, "DICOM", None if px is None else px.shape, f"chest X-ray {stem}, {tags}")

    if counts.get("mnist_digits", 0) > 0 and mnist_dir is not None and Path(mnist_dir).is_dir():   # d
        for i, (stem, img) in enumerate(mnist_digits(counts["mnist_digits"], mnist_dir, seed)):
            name = f"mnist_digits_{i:03d}_{stem}.png"
            add("mnist_digits", name, "PNG", _png(out / "mnist_digits" / name, img), f"MNIST {stem}")

    for kind in (k for k in KINDS if KINDS[k].group == "e"):                             # e
        rng = np.random.default_rng([seed, 5, list(KINDS).index(kind)])
        for i in range(counts.get(kind, 0)):
            img = render_picture(kind.split("_", 1)[1], rng)
            if rng.random() < 0.33:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            ext = ".jpg" if rng.random() < 0.5 else ".png"
            name = f"{kind}_{i:03d}{ext}"
            add(kind, name, "JPEG" if ext == ".jpg" else "PNG", _png(out / kind / name, img, ext),
                f"rendered {kind.split('_', 1)[1]}, seed {seed}")

    if shared_dir is not None and Path(shared_dir).is_dir():                            # f
        films = heldout_reframings(Path(shared_dir), {k: counts.get(k, 0) for k in KINDS if KINDS[k].group == "f"},
                                   seed)
        for kind, name, img, source in films:
            add(kind, name, "PNG", _png(out / kind / name, img), source)
    for ki, (kind, render) in enumerate(RENDERED.items()):                             # g
        name_kind = f"radiograph_{kind.removeprefix('rendered_')}"
        rng = np.random.default_rng([seed, 7, ki])
        for i in range(counts.get(name_kind, 0)):
            name = f"{name_kind}_{i:03d}.png"
            add(name_kind, name, "PNG", _png(out / name_kind / name, render(rng, int(rng.integers(256, 513)))),
                f"rendered {kind.removeprefix('rendered_')} radiograph, seed {seed}")

    out.mkdir(parents=True, exist_ok=True)
    with open(out / MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["relative_path"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr.quality.out_of_scope", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--cxr", help="folder of real chest X-rays for the tagged DICOMs (default: synthetic chests)")
    p.add_argument("--mnist", help="folder of the four MNIST .gz files (default: no digits)")
    p.add_argument("--shared", help="folder of cxr/ and cxr-adult/: their held-out films re-framed (group f)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = write_material(args.out, cxr_dir=args.cxr, mnist_dir=args.mnist, seed=args.seed, shared_dir=args.shared)
    for kind in KINDS:
        print(f"{kind}: {sum(r['kind'] == kind for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
