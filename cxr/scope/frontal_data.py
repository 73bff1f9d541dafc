"""The frontal-film check's data: the shared films split by patient as the preprocess job splits them, and the
training and held-out image sets made from them (64 px uint8, after the project's preprocessing).

Why a module of its own: training (cxr.scope.frontal_train), the out-of-scope material (held-out films
re-framed, cxr.quality.out_of_scope) and the benchmark (scripts/bench_scope.py) must agree on which film is in
which split, or the threshold and the measurement would see training films.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from cxr.common.splits import assign_split, validate_ratios
from cxr.image.pipeline import PreprocessParams, decode_with, equalization_input, preprocess_pixels
from cxr.scope.frontal import INPUT_SIDE
from cxr.scope.negatives import REFRAMINGS, RENDERED, render_picture

FOLDERS = ("cxr", "cxr-adult")
DECODED_SIDE = 384          # films are kept at most this long a side once decoded (every variant is smaller)
# the preprocessing the held-out scores are taken under: the recommended profile's and conf/default.yaml's
HELDOUT_VARIANTS = {"96-pad-clahe": PreprocessParams(size=96, resize_mode="pad"),
                    "224-stretch-clahe": PreprocessParams(size=224, resize_mode="stretch")}
COPIES = 4                  # jittered copies of each train film (positives)
REFRAMED_PER_FILM = 6       # re-framed negatives per train film (kinds taken in turn)
RENDERED_EACH = 300         # rendered radiographs per kind
PICTURES_EACH = 200         # rendered pictures per kind (shapes, gradients, text, textures)
DIGITS = 600                # MNIST train digits
SYNTH_CHESTS = 400          # rendered synthetic frontal chests (positives: the project's demo and test archives)


@dataclass(frozen=True)
class Film:
    path: str            # relative to the shared folder: FOLDER/CLASS/name
    folder: str
    split: str
    pixels: np.ndarray   # decoded gray uint8, at most DECODED_SIDE a side
    group: str = ""      # the patient key the split (and the calibration's folds) are drawn by


def split_conf() -> dict:
    """conf preprocess.split (ratios and seed): the preprocess job's assignment."""
    from cxr.config import load_config

    split = dict(load_config()["preprocess"]["split"])
    return {"ratios": validate_ratios(split), "seed": int(split.get("seed", 42))}


def film_groups(shared: Path) -> list[tuple[str, str, str]]:
    """(FOLDER/relative_path, folder, group key) of every film in the shared MANIFESTs: the key is the
    manifest's patient_id (else the file's sha256), as cxr.spark.images keys it."""
    out = []
    for folder in FOLDERS:
        manifest = shared / folder / "MANIFEST.csv"
        if not manifest.is_file():
            continue
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                pid = (row.get("patient_id") or "").strip()
                out.append((f"{folder}/{row['relative_path']}", folder,
                            f"patient:{pid}" if pid else f"sha256:{row['sha256']}"))
    return out


def film_splits(shared: Path) -> list[tuple[str, str, str]]:
    """(FOLDER/relative_path, folder, split) of every shared film, split by patient as the preprocess job does."""
    conf = split_conf()
    return [(p, f, assign_split(key, conf["ratios"], conf["seed"])) for p, f, key in film_groups(shared)]


def calibration_fold(group: str, folds: int, seed: int) -> int:
    """Which of `folds` folds a train film's patient falls in (a keyed hash: every film of a patient together)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") % folds


def decode_film(data: bytes, side: int = DECODED_SIDE) -> np.ndarray:
    """Gray uint8 pixels of a film file, at most `side` px a side (a reduced decode where the format allows)."""
    params = PreprocessParams(size=side // 2, decode_reduction="auto")
    img = equalization_input(decode_with(data, params))
    if img.dtype != np.uint8:
        from cxr.image.enhance import to_uint8

        img = to_uint8(img)
    scale = side / max(img.shape)
    if scale < 1:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def load_films(shared: Path, cache: Path | None = None) -> list[Film]:
    """Every shared film decoded, with its folder and split (cached in `cache`, an .npz of plain arrays)."""
    conf = split_conf()
    listing = [(p, f, assign_split(g, conf["ratios"], conf["seed"]), g) for p, f, g in film_groups(shared)]
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["paths"]) == [p for p, _, _, _ in listing]:
                return [Film(p, f, s, z[f"f{i}"], g) for i, (p, f, s, g) in enumerate(listing)]
    films = [Film(p, f, s, decode_film((shared / p).read_bytes()), g) for p, f, s, g in listing]
    if cache is not None:
        np.savez(cache, paths=np.array([f.path for f in films]), **{f"f{i}": f.pixels for i, f in enumerate(films)})
    return films


def heldout_films(shared: Path, splits: Iterable[str] = ("val", "test")) -> list[tuple[str, str, str]]:
    keep = set(splits)
    return [t for t in film_splits(shared) if t[2] in keep]


# ---------------------------------------------------------------------------------------------- images
def to_input_side(img: np.ndarray) -> np.ndarray:
    """A model-size uint8 image at the check's 64 px, as cxr.scope.frontal.scope_input makes it."""
    if img.shape == (INPUT_SIDE, INPUT_SIDE):
        return img
    shrink = img.shape[0] * img.shape[1] >= INPUT_SIDE * INPUT_SIDE
    return cv2.resize(img, (INPUT_SIDE, INPUT_SIDE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def random_params(rng: np.random.Generator) -> PreprocessParams:
    """A preprocessing a model might have been trained with."""
    return PreprocessParams(size=int(rng.choice([64, 96, 128, 224])),
                            method=str(rng.choice(["clahe", "clahe", "clahe", "he", "none"])),
                            resize_mode=str(rng.choice(["pad", "pad", "stretch", "stretch", "crop"])),
                            brightness_beta=float(rng.choice([0.0, 10.0])),
                            clip_limit=float(rng.choice([1.5, 2.0, 3.0])))


def prepared(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    return to_input_side(preprocess_pixels(gray, params))


def jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A frontal film as another site might send it: a few degrees of rotation, zoom and shift, a tighter or
    looser crop, another exposure (gamma), sometimes mirrored (a flipped film is still a frontal film)."""
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-8, 8), rng.uniform(0.9, 1.1))
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * (w, h)
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    t, b, lft, r = (int(v) for v in rng.uniform(0, 0.07, 4) * (h, h, w, w))
    out = out[t:h - b, lft:w - r]
    if rng.random() < 0.3:
        out = out[:, ::-1]
    lut = (255 * (np.arange(256) / 255.0) ** rng.uniform(0.75, 1.33)).astype(np.uint8)
    return np.ascontiguousarray(cv2.LUT(out, lut))


def to_gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img


@dataclass
class TrainingSet:
    x: np.ndarray        # (N, 64, 64) uint8
    y: np.ndarray        # (N,) int64: 1 frontal, 0 other
    counts: dict         # images per kind
    films: dict          # train films per folder
    films_sha256: str    # of the sorted train film paths


def training_set(films: list[Film], mnist_dir: Path | None, seed: int) -> TrainingSet:
    """Positives and negatives from the TRAIN films only (see cxr.scope.frontal_train)."""
    from cxr.datasets.synth import CLASSES, render_chest

    rng = np.random.default_rng([seed, 1])
    train = [f for f in films if f.split == "train"]
    xs, ys, counts = [], [], {}

    def add(kind: str, gray: np.ndarray, label: int) -> None:
        xs.append(prepared(to_gray(gray), random_params(rng)))
        ys.append(label)
        counts[kind] = counts.get(kind, 0) + 1

    kinds = list(REFRAMINGS)
    for i, film in enumerate(train):
        for _ in range(COPIES):
            add(f"frontal_{film.folder}", jitter(film.pixels, rng), 1)
        for j in range(REFRAMED_PER_FILM):
            kind = kinds[(i * REFRAMED_PER_FILM + j) % len(kinds)]
            base = jitter(film.pixels, rng) if rng.random() < 0.5 else film.pixels
            add(kind, REFRAMINGS[kind](base, rng), 0)
    for i in range(SYNTH_CHESTS):
        add("synth_chest", np.round(render_chest(CLASSES[i % 3], 256, rng) * 255).astype(np.uint8), 1)
    for kind, render in RENDERED.items():
        for _ in range(RENDERED_EACH):
            add(kind, render(rng, int(rng.integers(192, 320))), 0)
    prng = np.random.default_rng([seed, 1000])   # the material's pictures use seed 0's generators
    for kind in ("shapes", "gradients", "text", "textures"):
        for _ in range(PICTURES_EACH):
            add(f"picture_{kind}", render_picture(kind, prng), 0)
    if mnist_dir is not None and Path(mnist_dir).is_dir():
        from cxr.datasets.mnist import load_mnist

        digits, _ = load_mnist(mnist_dir, "train")
        for idx in rng.choice(len(digits), DIGITS, replace=False):
            add("mnist_train_digit", cv2.resize(digits[idx], (256, 256), interpolation=cv2.INTER_CUBIC), 0)
    paths = sorted(f.path for f in train)
    return TrainingSet(np.stack(xs), np.asarray(ys, np.int64), counts,
                       {folder: sum(f.folder == folder for f in train) for folder in FOLDERS},
                       hashlib.sha256("\n".join(paths).encode()).hexdigest())


@dataclass
class HeldOut:
    x: np.ndarray        # (N, 64, 64) uint8: every val/test film under every HELDOUT_VARIANTS preprocessing
    folder: np.ndarray
    split: np.ndarray
    variant: np.ndarray
    path: np.ndarray


def heldout_set(films: list[Film], splits: tuple[str, ...] = ("val", "test")) -> HeldOut:
    rows = [(prepared(f.pixels, params), f.folder, f.split, name, f.path)
            for f in films if f.split in splits for name, params in HELDOUT_VARIANTS.items()]
    return HeldOut(np.stack([r[0] for r in rows]), *(np.array([r[k] for r in rows]) for k in range(1, 5)))
