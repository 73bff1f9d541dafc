"""Pictures for checking the preprocessing by eye: the study's Figure 1 per image, and a contact sheet.

    python -m cxr.explain.viz preprocess FILE... --out PNG [--conf PROFILE] [--size N] [--method clahe|he|none]
    python -m cxr.explain.viz preprocess --from-parquet PRE_OUT [--n N] --out PNG
    python -m cxr.explain.viz samples PRE_OUT [--per-class K] [--splits train,val,test] --out PNG

`preprocess` shows every step of cxr.image.pipeline (original, equalized, brightness, resized) with its
intensity histogram underneath: CLAHE's effect is clearer in the histogram than in the picture. With
--from-parquet it re-reads the source files a preprocess output lists and repeats the steps with the params
its manifest.json recorded, and says whether the result still equals the stored image (it would not after a
library upgrade or a changed setting). `samples` draws K stored images per class and split, so a broken step
(all-black images, a wrong orientation) or a source artefact (text, rulers, a frame that only one class has)
shows at a glance; only the chosen rows' image bytes are read, through a pyarrow filter.

Figures have a fixed pixel size (no tight bounding box), given by figure1_size() and sheet_size().
A missing or empty input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

DPI = 80
STAGE_TITLES = {"original": "original", "equalized": "CLAHE", "brightness": "brightness", "resized": "resized"}
# Figure 1 panel: 4 columns of COL_W inches; per image an image row and a histogram row.
COL_W, IMG_H, HIST_H = 2.2, 2.2, 1.1
# Contact sheet: a label margin on the left, a header strip, K cells of CELL_W x CELL_H per row.
LABEL_W, HEADER_H, CELL_W, CELL_H = 0.9, 0.35, 1.3, 1.45
SPLIT_ORDER = ("train", "val", "test")


class VizError(Exception):
    """A user error (missing or empty input): printed as one line, exit status 2."""


def plt():
    """matplotlib.pyplot on the Agg backend (no display on workers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(fig, path, title: str | None = None, dpi: int = 80) -> Path:
    """Title, tight layout, PNG, and the figure closed (pyplot keeps every open figure alive otherwise)."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)
    return Path(path) if isinstance(path, (str, Path)) else path   # or the file object it was given


def _px(inches: float) -> int:
    return int(round(inches * DPI))


def figure1_size(n_images: int) -> tuple[int, int]:
    """(width, height) in pixels of a Figure-1 panel of n images."""
    return _px(4 * COL_W), _px(n_images * (IMG_H + HIST_H))


def sheet_size(n_rows: int, per_class: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet with n_rows (split, class) rows of per_class cells."""
    return _px(LABEL_W + per_class * CELL_W), _px(HEADER_H + n_rows * CELL_H)


# ----------------------------------------------------------------------------------------------- Figure 1

def _display_copy(img: np.ndarray, max_side: int = 400) -> np.ndarray:
    """Shrink big originals for drawing only (histograms use every pixel)."""
    import cv2

    h, w = img.shape
    if max(h, w) <= max_side:
        return img
    k = max_side / max(h, w)
    return cv2.resize(img, (max(1, int(w * k)), max(1, int(h * k))), interpolation=cv2.INTER_AREA)


def _histogram(img: np.ndarray) -> tuple[np.ndarray, str]:
    """256-bin histogram over the dtype's full range (16-bit images binned by their high byte)."""
    if img.dtype == np.uint16:
        return np.bincount((img >> 8).ravel(), minlength=256), "value / 256 (16-bit)"
    return np.bincount(img.astype(np.uint8, copy=False).ravel(), minlength=256), "value"


def figure1(items: Sequence[tuple[str, dict[str, np.ndarray]]], out: str | Path, params=None,
            notes: Sequence[str] | None = None) -> Path:
    """One panel per image: the four stages of preprocess_stages() in a row, their histograms below.

    items: (name, stages) pairs; params (PreprocessParams) only labels the columns; notes: one line per image.
    """
    if not items:
        raise VizError("no images to draw")
    pyplot = plt()
    n = len(items)
    width, height = figure1_size(n)
    fig = pyplot.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    outer = fig.add_gridspec(n, 1, left=0.03, right=0.99, top=1 - 0.3 / (height / DPI), bottom=0.2 / (height / DPI),
                             hspace=0.3)
    titles = dict(STAGE_TITLES)
    if params is not None:
        titles["equalized"] = {"clahe": f"CLAHE (clip {params.clip_limit:g}, {params.tile_grid}x{params.tile_grid})",
                               "he": "histogram equalization", "none": "no equalization"}[params.method]
        titles["brightness"] = f"brightness {params.brightness_alpha:g}x+{params.brightness_beta:g}"
        titles["resized"] = f"resized ({params.resize_mode})"
    for i, (name, stages) in enumerate(items):
        grid = outer[i].subgridspec(2, 4, height_ratios=[IMG_H, HIST_H], hspace=0.08, wspace=0.12)
        for j, key in enumerate(("original", "equalized", "brightness", "resized")):
            img = stages[key]
            top = np.iinfo(img.dtype).max if img.dtype.kind == "u" else float(img.max())
            ax = fig.add_subplot(grid[0, j])
            ax.set_anchor("S")  # sit on the histogram, whatever the aspect ratio
            ax.imshow(_display_copy(img), cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            head = f"{Path(name).name[:34]}\n" if j == 0 else "\n"
            ax.set_title(f"{head}{titles[key]}  {img.shape[1]}x{img.shape[0]} {img.dtype}", fontsize=6.5)
            hist, xlabel = _histogram(img)
            hx = fig.add_subplot(grid[1, j])
            hx.fill_between(np.arange(256), hist, step="mid", color="#4c72b0", linewidth=0)
            hx.set_xlim(0, 255)
            hx.set_yticks([])
            hx.tick_params(labelsize=6)
            if xlabel != "value":
                hx.set_xlabel(xlabel, fontsize=6, labelpad=1)
            if j == 0 and notes and notes[i]:
                hx.set_title(notes[i], fontsize=6, loc="left", color="#c44e52")
    fig.savefig(out, dpi=DPI)
    pyplot.close(fig)
    return Path(out)


def stages_of_file(path: str | Path, params) -> dict[str, np.ndarray]:
    """Decode one file and run the preprocessing steps, keeping every stage; user errors become VizError."""
    from cxr.image.pipeline import decode_with, equalization_input, preprocess_stages
    from cxr.image.rejection import RejectedImage

    p = Path(path)
    if not p.is_file():
        raise VizError(f"{path}: no such file")
    data = p.read_bytes()
    try:
        decoded = decode_with(data, params)   # as the preprocess job decodes (16-bit window, reduced decode)
    except RejectedImage as exc:
        raise VizError(f"{path}: {exc.reason}") from None
    return preprocess_stages(equalization_input(decoded), params)


def _read_uri(uri: str) -> bytes:
    """A file named by a Spark path column (file:/..., hdfs://..., s3://...) or a plain path."""
    import pyarrow.fs as pafs

    if uri.startswith("file:"):
        local = uri[len("file:"):]
        while local.startswith("//"):
            local = local[1:]
        return Path(local).read_bytes()
    if "://" not in uri:
        return Path(uri).read_bytes()
    fs, inner = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def _params_from_manifest(pre_out: str):
    from cxr.data.loader import read_manifest
    from cxr.image.pipeline import PreprocessParams

    manifest, _ = read_manifest(pre_out)
    if "size" not in (manifest.get("params") or {}):
        raise VizError(f"{pre_out}/manifest.json records no preprocess params")
    return PreprocessParams.from_dict(manifest["params"])


def _rows_metadata(pre_out: str):
    """(path, sha256, label, split) of every row of PRE_OUT/images, without image bytes."""
    from cxr.data.loader import images_dataset

    try:
        table = images_dataset(pre_out).to_table(columns=["path", "sha256", "label", "split"])
    except FileNotFoundError as exc:
        raise VizError(str(exc)) from None
    if table.num_rows == 0:
        raise VizError(f"{pre_out}/images holds no rows: nothing to draw")
    return table.to_pandas()


def _stored_images(pre_out: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
    """The stored preprocessed images of the given sha256s only (a pyarrow filter: other rows' bytes are
    decoded page by page and dropped, never collected)."""
    import pyarrow.dataset as ds

    from cxr.data.loader import images_dataset

    table = images_dataset(pre_out).to_table(columns=["sha256", "image", "height", "width"],
                                             filter=ds.field("sha256").isin(list(shas)), batch_size=64)
    out = {}
    for sha, img, h, w in zip(*(table.column(c).to_pylist() for c in ("sha256", "image", "height", "width"))):
        out[sha] = np.frombuffer(img, np.uint8).reshape(int(h), int(w))
    return out


def _spread(meta, n: int, seed: int = 0):
    """n rows taken round-robin over the labels, each label's rows in a seeded shuffled order."""
    groups = [g.sample(frac=1.0, random_state=seed) for _, g in meta.fillna({"label": "unlabeled"})
              .sort_values("sha256").groupby("label", sort=True)]
    picked = []
    for k in range(max(len(g) for g in groups)):
        for g in groups:
            if k < len(g) and len(picked) < n:
                picked.append(g.iloc[k])
    return picked


def figure1_from_parquet(pre_out: str, n: int, out: str | Path, seed: int = 0) -> Path:
    """Figure 1 for n rows of a preprocess output (see recompute_from_parquet)."""
    items, notes, params = recompute_from_parquet(pre_out, n, seed)
    return figure1(items, out, params, notes)


def recompute_from_parquet(pre_out: str, n: int, seed: int = 0):
    """(items, notes, params) for n rows of a preprocess output: source files re-read, steps repeated with the
    manifest's params; a row's note is non-empty when the result differs from the stored image."""
    params = _params_from_manifest(pre_out)
    meta = _rows_metadata(pre_out)
    rows = _spread(meta, n, seed)
    stored = _stored_images(pre_out, [r["sha256"] for r in rows])
    items, notes = [], []
    from cxr.image.pipeline import decode_with, equalization_input, preprocess_stages
    from cxr.image.rejection import RejectedImage

    for r in rows:
        try:
            data = _read_uri(r["path"])
            decoded = decode_with(data, params)
        except (OSError, RejectedImage) as exc:
            raise VizError(f"cannot re-read the source of {r['sha256'][:12]} ({r['path']}): {exc}") from None
        stages = preprocess_stages(equalization_input(decoded), params)
        same = r["sha256"] in stored and np.array_equal(stages["resized"], stored[r["sha256"]])
        label = r["label"] if isinstance(r["label"], str) else "unlabeled"
        items.append((f"{label}/{r['path'].rsplit('/', 1)[-1]}", stages))
        notes.append("" if same else "recomputed image differs from the stored one")
    return items, notes, params


# ------------------------------------------------------------------------------------------- contact sheet

def choose_samples(meta, per_class: int, splits: Sequence[str] | None = None, seed: int = 0):
    """{(split, label): rows} with up to per_class rows each, a seeded random choice (stable across runs)."""
    meta = meta.fillna({"label": "unlabeled", "split": "none"})
    if splits:
        meta = meta[meta["split"].isin(list(splits))]
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    keys = sorted(meta.groupby(["split", "label"]).groups, key=lambda k: (order.get(k[0], 99), k[0], k[1]))
    out = {}
    for split, label in keys:
        g = meta[(meta["split"] == split) & (meta["label"] == label)].sort_values("sha256")
        out[(split, label)] = g.sample(n=min(per_class, len(g)), random_state=seed).sort_values("path")
    return out


def contact_sheet(pre_out: str, per_class: int, out: str | Path, splits: Sequence[str] | None = None,
                  seed: int = 0) -> Path:
    """K stored images per (split, class) of a preprocess output, one row each, file names under them."""
    if per_class < 1:
        raise VizError("--per-class must be at least 1")
    meta = _rows_metadata(pre_out)
    chosen = choose_samples(meta, per_class, splits, seed)
    if not chosen:
        raise VizError(f"no rows of split(s) {', '.join(splits or [])} in {pre_out}")
    stored = _stored_images(pre_out, [s for rows in chosen.values() for s in rows["sha256"]])
    pyplot = plt()
    width, height = sheet_size(len(chosen), per_class)
    fig = pyplot.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - (HEADER_H / 2) / (height / DPI), f"{Path(str(pre_out)).name}: {per_class} per class and split "
             f"({len(meta)} rows in all)", ha="center", va="center", fontsize=8)
    cell_w, cell_h = CELL_W / (width / DPI), CELL_H / (height / DPI)
    left0, top0 = LABEL_W / (width / DPI), 1 - HEADER_H / (height / DPI)
    for i, ((split, label), rows) in enumerate(chosen.items()):
        y0 = top0 - (i + 1) * cell_h
        n_group = int(((meta["split"].fillna("none") == split) & (meta["label"].fillna("unlabeled") == label)).sum())
        fig.text(left0 * 0.5, y0 + cell_h / 2, f"{split}\n{label}\n({n_group})", ha="center", va="center",
                 fontsize=7)
        for j, (_, r) in enumerate(rows.iterrows()):
            ax = fig.add_axes([left0 + j * cell_w + 0.04 * cell_w, y0 + 0.16 * cell_h, 0.92 * cell_w, 0.8 * cell_h])
            img = stored.get(r["sha256"])
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(r["path"].rsplit("/", 1)[-1][:22], fontsize=5, labelpad=1)
    fig.savefig(out, dpi=DPI)
    pyplot.close(fig)
    return Path(out)


# --------------------------------------------------------------------------------------------------- CLI

def _params_for_files(args):
    from cxr.config import load_config
    from cxr.image.pipeline import PreprocessParams

    overrides = {"preprocess.size": args.size, "preprocess.method": args.method,
                 "preprocess.clip_limit": args.clip_limit, "preprocess.tile_grid": args.tile_grid}
    return PreprocessParams.from_config(load_config(args.conf, overrides)["preprocess"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr.explain.viz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preprocess", help="Figure 1: each preprocessing stage with its histogram")
    p.add_argument("files", nargs="*", help="image files (any format the preprocess job reads)")
    p.add_argument("--from-parquet", metavar="PRE_OUT", help="a preprocess output: re-read N of its source files")
    p.add_argument("--n", type=int, default=3, help="images to draw with --from-parquet (default 3)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--conf", help="config profile or YAML for the params (FILE mode; default conf/default.yaml)")
    p.add_argument("--size", type=int)
    p.add_argument("--method", choices=("clahe", "he", "none"))
    p.add_argument("--clip-limit", type=float)
    p.add_argument("--tile-grid", type=int)
    p.add_argument("--seed", type=int, default=0, help="which rows --from-parquet picks")
    s = sub.add_parser("samples", help="contact sheet of K preprocessed images per class and split")
    s.add_argument("pre_out", metavar="PRE_OUT", help="a preprocess job's output folder")
    s.add_argument("--per-class", type=int, default=6, help="images per class and split (default 6)")
    s.add_argument("--splits", help="comma list of splits to show (default: all)")
    s.add_argument("--seed", type=int, default=0, help="which rows are picked")
    s.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        if not Path(args.out).parent.is_dir():
            raise VizError(f"folder of --out does not exist: {Path(args.out).parent}")
        if args.command == "preprocess":
            if bool(args.files) == bool(args.from_parquet):
                raise VizError("give image FILEs or --from-parquet PRE_OUT (one of the two)")
            if args.from_parquet:
                if args.n < 1:
                    raise VizError("--n must be at least 1")
                path = figure1_from_parquet(args.from_parquet, args.n, args.out, args.seed)
            else:
                params = _params_for_files(args)
                path = figure1([(f, stages_of_file(f, params)) for f in args.files], args.out, params)
        else:
            splits = [x.strip() for x in args.splits.split(",") if x.strip()] if args.splits else None
            path = contact_sheet(args.pre_out, args.per_class, args.out, splits, args.seed)
    except (VizError, FileNotFoundError, ValueError) as exc:
        print(f"cxr.explain.viz: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
