"""Grad-CAM for the Keras CNN and separable CNN, and a check for shortcut learning built on it.

Grad-CAM (Selvaraju et al., 2017): weight each channel of the last convolutional layer's output by the mean
gradient of the class score (the logit, before softmax) with respect to it, sum, keep the positive part and
upsample to the image. It shows where the evidence for a call sits, which is how a model that reads the
hospital's text label or a frame in the corner instead of the lungs gets caught.

The default is the HiResCAM variant (Draelos & Carin, 2020): the same gradients of the same layer, multiplied
with the activations element by element instead of averaged over the image first. The study's CNN ends in
Flatten + Dense, so its class score depends on *where* a feature fires; averaging the gradient over positions
mixes the weights of all positions. On the corner-blob test model (tests/test_explain.py) plain Grad-CAM gave
an all-zero map for 75% of the COVID and 100% of the VIRAL images while HiResCAM put ~88% of the mass in the
right corner; on the real sample set's cnn-adam (128 px) plain Grad-CAM was all zero for 118 of 150 NORMAL
images. For a model ending in global average pooling + one Dense the two agree. `method="gradcam"` gives the
classic one.

    gradcam(model, x) -> (cams in [0, 1] (N, H, W), proba)
    overlay(gray_u8, cam) -> RGB picture: the image beside the heatmap over it
    shortcut_check(model, images, labels) -> per-class share of Grad-CAM mass on the border / outside a
                                              central lung box, with warnings
    shortcut_section(model_dir, data_dir) -> markdown for report.md (and a mean-heatmap plot)

TensorFlow is imported only inside the functions, so Spark workers that never explain do not load it.
Scratch (cxr.nn) models and the DNN have no convolutional layer in Keras: they are refused with a reason.
A seed ensemble (train.ensemble) is explained per member and averaged: every member's heatmap for the class the
ensemble calls (its mean probability's argmax, or the class asked for), each scaled to max 1, then their mean
scaled to max 1 again, so each member counts equally; the probabilities returned are the ensemble's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cxr import CLASSES

BORDER = 0.06                      # outer band, as a fraction of the side: ~23% of the image area
LUNG_BOX = (0.10, 0.08, 0.90, 0.88)  # (x0, y0, x1, y1) fractions: a central box holding both lung fields
WARN_BORDER_LIFT = 2.0             # mean border mass >= this x the band's area share -> warning
WARN_PEAK_ON_BORDER = 0.5          # or the heatmap peak on the border in at least this share of images
WARN_PEAK_MIN_LIFT = 1.25          # ... while the border mass is also above its area share by this factor
WARN_OUTSIDE_LUNG = 0.6            # mean mass outside the lung box (area share 36%) -> warning
EXPLAINABLE_FAMILIES = ("cnn", "dwsep")


class NotExplainable(ValueError):
    """A model Grad-CAM cannot explain (no convolutional layer, or not a Keras model)."""


# ------------------------------------------------------------------------------------------------ Grad-CAM

def conv_layer(model, name: str | None = None):
    """The named layer, or the last layer with a 4-D output whose class is a convolution."""
    if name:
        return model.get_layer(name)
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer never called on a symbolic input
            continue
        if len(shape) == 4 and "conv" in type(layer).__name__.lower():
            return layer
    raise NotExplainable(f"model {model.name!r} has no convolutional layer: Grad-CAM needs one "
                         "(the CNN and the separable CNN have them, the DNN does not)")


def _split_forward(model, layer):
    """A function x -> (conv activations, logits) through the model's own layers (training=False).

    The last layer must be a softmax Dense (every model in cxr.models.keras_models is): its pre-activation is
    the class score Grad-CAM differentiates, since gradients through a saturated softmax vanish."""
    import keras

    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or getattr(last.activation, "__name__", "") != "softmax":
        raise NotExplainable(f"model {model.name!r} does not end in a softmax Dense layer")

    def logits_of(h):
        return keras.ops.matmul(h, last.kernel) + last.bias

    if isinstance(model, keras.Sequential):
        def forward(x):
            acts = None
            for lay in model.layers[:-1]:
                x = lay(x, training=False)
                if lay is layer:
                    acts = x
            return acts, logits_of(x)
        return forward
    sub = keras.Model(model.inputs, [layer.output, last.input])

    def forward(x):
        acts, h = sub(x, training=False)
        return acts, logits_of(h)
    return forward


def _as_model_input(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)


METHODS = ("hirescam", "gradcam")


def gradcam(model, images: np.ndarray, class_index: int | Sequence[int] | None = None,
            layer_name: str | None = None, batch_size: int = 32,
            method: str = "hirescam") -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps (N, H, W) float32, each scaled to max 1 (all zeros where no evidence is positive),
    and the model's probabilities (N, K). images: (N, H, W[, 1]) uint8 or float in [0, 1]; class_index:
    the class explained per image (default: the predicted one); method: "hirescam" (gradient x activation
    per position, the default, see the module docstring) or "gradcam" (spatially averaged gradient)."""
    import cv2
    import tensorflow as tf

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(model, (list, tuple)):
        return _ensemble_gradcam(list(model), images, class_index, layer_name, batch_size, method)
    x = _as_model_input(images)
    n, h, w = x.shape[:3]
    layer = conv_layer(model, layer_name)
    forward = _split_forward(model, layer)
    cams = np.zeros((n, h, w), np.float32)
    proba = np.zeros((n, int(model.layers[-1].units)), np.float32)
    wanted = None if class_index is None else np.broadcast_to(np.asarray(class_index, np.int64), (n,))
    for start in range(0, n, batch_size):
        xb = tf.convert_to_tensor(x[start:start + batch_size])
        with tf.GradientTape() as tape:
            acts, logits = forward(xb)
            idx = (tf.argmax(logits, axis=1) if wanted is None
                   else tf.convert_to_tensor(wanted[start:start + len(xb)]))
            score = tf.reduce_sum(tf.gather(logits, idx, axis=1, batch_dims=1))
        grads = tape.gradient(score, acts)
        if method == "gradcam":
            grads = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        maps = tf.nn.relu(tf.reduce_sum(grads * acts, axis=-1)).numpy()
        proba[start:start + len(xb)] = tf.nn.softmax(logits, axis=1).numpy()
        for i, m in enumerate(maps):
            top = float(m.max())
            if top > 0:
                cams[start + i] = cv2.resize(m / top, (w, h), interpolation=cv2.INTER_LINEAR)
    np.clip(cams, 0.0, 1.0, out=cams)
    return cams, proba


def _ensemble_gradcam(models: list, images: np.ndarray, class_index, layer_name, batch_size: int,
                      method: str) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of a seed ensemble: the members' heatmaps of one class per image, averaged (module docstring)."""
    if not models:
        raise NotExplainable("an ensemble without members")
    x = _as_model_input(images)
    if class_index is None:
        proba = np.mean([np.concatenate([m(x[i:i + batch_size], training=False).numpy()
                                         for i in range(0, len(x), batch_size)] or [np.zeros((0, 3), np.float32)])
                         for m in models], axis=0)
        class_index = proba.argmax(axis=1)
    cams, probas = zip(*[gradcam(m, x, class_index, layer_name, batch_size, method) for m in models])
    cam = np.mean(cams, axis=0)
    top = cam.reshape(len(cam), -1).max(axis=1) if len(cam) else np.zeros(0, np.float32)
    cam = np.where(top[:, None, None] > 0, cam / np.maximum(top, 1e-12)[:, None, None], 0.0).astype(np.float32)
    return cam, np.mean(probas, axis=0).astype(np.float32)


def load_explainable(model_dir: str | Path):
    """The Keras model of model_dir, or the list of its members' models for an ensemble (gradcam takes both)."""
    from cxr.models import store

    check_explainable(model_dir)
    members = store.ensemble_members(model_dir)
    if members:
        return [store.load_keras(m / store.KERAS_FILE) for m in members]
    return store.load_keras(Path(model_dir) / store.KERAS_FILE)


def overlay(gray: np.ndarray, cam: np.ndarray, caption: str | None = None, alpha: float = 0.45,
            min_side: int = 192) -> np.ndarray:
    """RGB uint8: the preprocessed image on the left, the heatmap (jet) blended over it on the right, an
    optional caption strip on top; small images are enlarged (nearest) to min_side so they can be read."""
    import cv2

    g = np.asarray(gray)
    if g.dtype != np.uint8:
        g = np.clip(np.round(g * 255), 0, 255).astype(np.uint8)
    g = g.reshape(g.shape[0], g.shape[1])
    heat = cv2.applyColorMap(np.clip(np.round(cam * 255), 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    blended = cv2.addWeighted(heat, alpha, base, 1 - alpha, 0)
    pair = np.concatenate([base, np.full((g.shape[0], 2, 3), 255, np.uint8), blended], axis=1)
    k = max(1, int(np.ceil(min_side / g.shape[0])))
    if k > 1:
        pair = cv2.resize(pair, (pair.shape[1] * k, pair.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    if caption:
        strip = np.full((18, pair.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, caption[:80], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        pair = np.concatenate([strip, pair], axis=0)
    return cv2.cvtColor(pair, cv2.COLOR_BGR2RGB)


def png_bytes(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def check_explainable(model_dir: str | Path) -> None:
    """Refuse early (before a score run spends its time) models Grad-CAM cannot explain; reads metrics.json only."""
    from cxr.models import store

    meta = store.read_metadata(model_dir)
    kind = store.model_kind(model_dir)
    if kind == "ensemble":
        for member in store.ensemble_members(model_dir):
            check_explainable(member)
        return
    if kind != "keras":
        raise NotExplainable(f"{model_dir}: Grad-CAM needs a Keras model with a convolutional layer; this is a "
                             f"{kind} (cxr.nn) model")
    family = meta.get("family")
    if family is not None and family not in EXPLAINABLE_FAMILIES:
        raise NotExplainable(f"{model_dir}: model family {family!r} has no convolutional layer; Grad-CAM "
                             f"explains {', '.join(EXPLAINABLE_FAMILIES)}")


# ----------------------------------------------------------------------------------------- shortcut check

def region_masks(h: int, w: int, border: float = BORDER, lung_box=LUNG_BOX) -> tuple[np.ndarray, np.ndarray]:
    """(border band, outside the central lung box) as boolean (h, w) masks."""
    bh, bw = max(1, int(round(border * h))), max(1, int(round(border * w)))
    band = np.ones((h, w), bool)
    band[bh:h - bh, bw:w - bw] = False
    x0, y0, x1, y1 = lung_box
    outside = np.ones((h, w), bool)
    outside[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))] = False
    return band, outside


def cam_fractions(cams: np.ndarray, border: float = BORDER, lung_box=LUNG_BOX) -> dict[str, np.ndarray]:
    """Per heatmap: share of its mass on the border band and outside the lung box, whether its peak is on
    the border / outside the box, and whether it is empty (no positive evidence: fractions NaN)."""
    cams = np.asarray(cams, np.float64)
    n, h, w = cams.shape
    band, outside = region_masks(h, w, border, lung_box)
    total = cams.sum(axis=(1, 2))
    empty = total <= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        on_border = np.where(empty, np.nan, cams[:, band].sum(axis=1) / total)
        off_lung = np.where(empty, np.nan, cams[:, outside].sum(axis=1) / total)
    peak = cams.reshape(n, -1).argmax(axis=1)
    return {"border": on_border, "outside_lung": off_lung, "peak_on_border": band.ravel()[peak] & ~empty,
            "peak_outside_lung": outside.ravel()[peak] & ~empty, "empty": empty}


def shortcut_check(model, images: np.ndarray, labels: Sequence[int] | np.ndarray, class_names=CLASSES,
                   border: float = BORDER, lung_box=LUNG_BOX, batch_size: int = 32,
                   method: str = "hirescam") -> dict[str, Any]:
    """Where the evidence for each true class sits: Grad-CAM of the true class on images of that class.

    Returns per class the mean share of heatmap mass on the border band and outside the central lung box
    (with the shares a uniform heatmap would have, for comparison), how often the peak is there, and
    `warnings` naming classes that rely on the border (mass >= WARN_BORDER_LIFT x the band's area share, or
    the peak on the border in >= WARN_PEAK_ON_BORDER of images with mass >= WARN_PEAK_MIN_LIFT x area) or on
    the area outside the lungs. The mean
    heatmap per class is in `mean_cam` (NumPy arrays; drop it before writing JSON)."""
    y = np.asarray([class_names.index(v) if isinstance(v, str) else int(v) for v in labels], np.int64)
    x = _as_model_input(images)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("no images to check")
    cams, proba = gradcam(model, x, class_index=y, batch_size=batch_size, method=method)
    fr = cam_fractions(cams, border, lung_box)
    band, outside = region_masks(*cams.shape[1:], border, lung_box)
    area = {"border": float(band.mean()), "outside_lung": float(outside.mean())}
    per_class, mean_cam, warnings = {}, {}, []
    for i, name in enumerate(class_names):
        sel = y == i
        if not sel.any():
            continue
        ok = sel & ~fr["empty"]
        stats = {
            "n": int(sel.sum()), "empty_heatmaps": int((sel & fr["empty"]).sum()),
            "accuracy": float((proba[sel].argmax(axis=1) == i).mean()),
            "border_fraction": float(np.mean(fr["border"][ok])) if ok.any() else None,
            "outside_lung_fraction": float(np.mean(fr["outside_lung"][ok])) if ok.any() else None,
            "peak_on_border": float(fr["peak_on_border"][ok].mean()) if ok.any() else None,
            "peak_outside_lung": float(fr["peak_outside_lung"][ok].mean()) if ok.any() else None,
        }
        stats["border_lift"] = (None if stats["border_fraction"] is None
                                else stats["border_fraction"] / area["border"])
        per_class[name] = stats
        mean_cam[name] = cams[sel].mean(axis=0)
        if stats["border_fraction"] is None:
            continue
        if stats["border_lift"] >= WARN_BORDER_LIFT or (stats["peak_on_border"] >= WARN_PEAK_ON_BORDER
                                                        and stats["border_lift"] >= WARN_PEAK_MIN_LIFT):
            warnings.append(
                f"{name} relies on the image border: {stats['border_fraction']:.0%} of its Grad-CAM mass lies in "
                f"the outer {border:.0%} band (a uniform map puts {area['border']:.0%} there) and the peak is on "
                f"the border in {stats['peak_on_border']:.0%} of its images; look for text, markers or frames "
                f"that only this class's source has")
        elif stats["outside_lung_fraction"] >= WARN_OUTSIDE_LUNG:
            warnings.append(
                f"{name}: {stats['outside_lung_fraction']:.0%} of its Grad-CAM mass lies outside the central lung "
                f"box (uniform: {area['outside_lung']:.0%}): the evidence is mostly not in the lungs")
    return {"target": "true class", "method": method, "n": int(len(y)), "border": border, "lung_box": list(lung_box),
            "area_fraction": area, "per_class": per_class, "warnings": warnings, "mean_cam": mean_cam}


def plot_mean_cams(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Mean Grad-CAM per class with the border band and lung box drawn: one glance shows where each class's
    evidence sits."""
    from cxr.explain.viz import plt, save_figure

    pyplot = plt()
    names = list(result["mean_cam"])
    fig, axes = pyplot.subplots(1, len(names), figsize=(2.4 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        cam = result["mean_cam"][name]
        h, w = cam.shape
        ax.imshow(cam, cmap="jet", vmin=0, vmax=max(float(cam.max()), 1e-9))
        b = result["border"]
        x0, y0, x1, y1 = result["lung_box"]
        ax.add_patch(pyplot.Rectangle((b * w - .5, b * h - .5), w * (1 - 2 * b), h * (1 - 2 * b), fill=False,
                                      ec="white", ls=":", lw=1))
        ax.add_patch(pyplot.Rectangle((x0 * w - .5, y0 * h - .5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                      ec="white", lw=1))
        s = result["per_class"][name]
        frac = "n/a" if s["border_fraction"] is None else f"{s['border_fraction']:.0%}"
        ax.set_title(f"{name} (n={s['n']})\nborder {frac}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path, title)


def shortcut_markdown(result: Mapping[str, Any], model_name: str = "", image: str | None = None,
                      split: str = "") -> str:
    """The report's section for one model's shortcut_check result."""
    a = result["area_fraction"]
    pct = (lambda v: "n/a" if v is None else f"{v:.0%}")
    split = {"all": "train+val+test"}.get(split, split)
    lines = [f"### Shortcut check{': ' + model_name if model_name else ''}", "",
             f"{'Grad-CAM (HiResCAM variant)' if result.get('method') == 'hirescam' else 'Grad-CAM'} of the true "
             f"class on {result['n']} {split + ' ' if split else ''}images: share of the heatmap "
             f"mass on the outer {result['border']:.0%} border band (a uniform map: {a['border']:.0%}) and outside "
             f"a central lung box (uniform: {a['outside_lung']:.0%}), and how often the peak lies there.", "",
             "| class | n | accuracy | mass on border | peak on border | mass outside lung box | peak outside box |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["per_class"].items():
        lines.append(f"| {name} | {s['n']} | {pct(s['accuracy'])} | {pct(s['border_fraction'])} | "
                     f"{pct(s['peak_on_border'])} | {pct(s['outside_lung_fraction'])} | "
                     f"{pct(s['peak_outside_lung'])} |")
    lines.append("")
    for w in result["warnings"]:
        lines += [f"> **Warning:** {w}", ""]
    if not result["warnings"]:
        lines += ["No class relies mainly on the border or outside the lung box by these thresholds (this does "
                  "not prove the evidence is medical: a source difference inside the lungs would pass).", ""]
    if image:
        lines += [f"![Mean Grad-CAM per class{', ' + model_name if model_name else ''}]({image})", ""]
    return "\n".join(lines)


def shortcut_section(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                     plots_dir: str | Path | None = None, max_images: int = 2000,
                     method: str = "hirescam") -> tuple[str, dict | None]:
    """The report hook: run shortcut_check for one saved model on PRE_OUT's split and return (markdown, result
    without the heatmaps). With plots_dir, the mean heatmaps go to plots_dir/shortcut_<model>.png and the
    markdown links them as plots/<file> (relative to the models folder, as report.md's other plots)."""
    from cxr.data.loader import load_split
    from cxr.models import store

    name = Path(model_dir).name
    try:
        check_explainable(model_dir)
    except NotExplainable as exc:
        return f"### Shortcut check: {name}\n\n(not run: {exc})\n", None
    model = load_explainable(model_dir)
    splits = ("train", "val", "test") if split == "all" else tuple(s.strip() for s in split.split(","))
    data = load_split(str(data_dir), splits, limit=max_images)  # reads no more than it checks
    if len(data) == 0:
        return f"### Shortcut check: {name}\n\n(not run: no labeled {split} images)\n", None
    x, y = data.x[:max_images], data.y[:max_images]
    result = shortcut_check(model, x, y, method=method)
    image = None
    if plots_dir is not None:
        png = plot_mean_cams(result, Path(plots_dir) / f"shortcut_{name}.png",
                             f"{name}: mean {'HiResCAM' if method == 'hirescam' else 'Grad-CAM'} on {split}")
        image = f"{Path(plots_dir).name}/{png.name}"
    plain = {k: v for k, v in result.items() if k != "mean_cam"}
    return shortcut_markdown(result, name, image, split), plain
