"""Export a saved model to model.onnx beside it, checked against the model itself before it is kept.

Why: ONNX Runtime runs the same network on the executors without TensorFlow (a smaller executor
environment, a faster start per Python worker, and faster CPU inference). The export runs on the driver:

- Keras models (model.keras) go through tf2onnx.convert.from_function at opset 17;
- cxr.nn scratch models (model.json + model.npz) are written operator by operator with onnx.helper. cxr.nn
  is NHWC like Keras while ONNX's Conv and MaxPool are NCHW: the graph transposes in before the first
  convolution and back before Flatten, so Flatten and the Dense kernels see Keras' (H, W, C) feature order.

Both graphs take float32 (N, H, W, 1) images in [0, 1] named "image" and return (N, 3) probabilities named
"proba". A scratch model's area resize to its own input size stays outside the graph, in numpy
(Predictor._resize), exactly as the scratch predictor does it.

Before model.onnx is kept, the model and ONNX Runtime run on the given images (the val split in training)
or a fixed seeded random batch; a max |difference| of probabilities above `atol` raises OnnxExportError and
leaves no new model.onnx. metrics.json records the check under "onnx".

    python -m cxr.models.onnx_export MODEL_DIR [MODEL_DIR ...] [--data PRE_OUT]   (models trained before this)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr import CLASSES
from cxr.models import store

OPSET = 17
IR_VERSION = 8            # the IR version that goes with opset 17: any ONNX Runtime since 1.13 reads it
INPUT_NAME = "image"
OUTPUT_NAME = "proba"
MAX_CHECK_IMAGES = 512    # the check runs on at most this many of the given images (bounds export time)
RANDOM_CHECK_IMAGES = 16  # without images: a seeded uniform [0, 1) batch of this size


class OnnxExportError(ValueError):
    """The exported graph does not reproduce the model (or the model has a layer the exporter lacks)."""


def export_onnx(model_dir: str | Path, val_images: np.ndarray | None = None, atol: float = 1e-5,
                max_images: int = MAX_CHECK_IMAGES, images_from: str | None = None) -> Path:
    """Write model_dir/model.onnx for the saved model in model_dir and record the check in metrics.json.

    val_images: float32 (N, H, W, 1) in [0, 1] at the data size, as fed to the model (None or empty: a seeded
    random batch), the first max_images of them used; images_from says what they are, for the record.
    Raises OnnxExportError if ONNX Runtime's probabilities differ by more than atol."""
    d = Path(model_dir)
    t0 = time.perf_counter()
    source = store.load_predictor(d, engine="keras")
    x = check_images(source, val_images, max_images)
    if source.kind == "keras":
        proto = keras_to_onnx(source.model, source.model.input_shape[1:])
    else:
        proto = scratch_to_onnx(source.model)
    proto.doc_string = f"cxr model {source.name} ({source.kind}); classes {', '.join(CLASSES)}"

    import onnx

    onnx.checker.check_model(proto)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=store.ONNX_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(proto.SerializeToString())
        exported = store.OnnxPredictor(d, source.metadata, batch_size=source.batch_size, threads=1, onnx_path=tmp)
        diff = max_abs_diff(source.predict_proba(x), exported.predict_proba(x))
        del exported
        if not diff <= atol:  # also catches NaN
            raise OnnxExportError(f"{d}: ONNX Runtime's probabilities differ from the {source.kind} model's by "
                                  f"max |diff| = {diff:.3g} > atol {atol:g} on {len(x)} images: model.onnx not "
                                  "written (score/evaluate with --engine keras, or report the model's layers)")
        os.replace(tmp, d / store.ONNX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = store.read_metadata(d)
    meta["onnx"] = {"file": store.ONNX_FILE, "opset": OPSET, "max_abs_diff": diff, "atol": atol,
                    "checked_on": int(len(x)), "checked_with": (images_from or "images given") if _has(val_images) else
                    f"seeded uniform random batch (seed 0, {len(x)} images)", "source": source.kind,
                    "input": INPUT_NAME, "output": OUTPUT_NAME, "versions": _versions(source.kind),
                    "export_s": round(time.perf_counter() - t0, 3)}
    files = [f for f in meta.get("files") or [] if f not in (store.ONNX_FILE, store.METRICS_FILE)]
    meta["files"] = [*files, store.ONNX_FILE, store.METRICS_FILE]
    store.write_metadata(d, meta)
    return d / store.ONNX_FILE


def _has(images) -> bool:
    return images is not None and len(images) > 0


def check_images(predictor: store.Predictor, images: np.ndarray | None, max_images: int) -> np.ndarray:
    """The batch the check runs on, at the data size the predictor is given (its _resize does the rest)."""
    if _has(images):
        return predictor._check(np.asarray(images)[:max_images])
    h, w = predictor.input_size or predictor.model_size
    return np.random.default_rng(0).random((RANDOM_CHECK_IMAGES, h, w, 1), dtype=np.float32)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise OnnxExportError(f"ONNX Runtime returned shape {b.shape}, the model {a.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _versions(kind: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnx", "onnxruntime", *(("tf2onnx", "tensorflow-cpu") if kind == "keras" else ())):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _rename_output(proto, name: str):
    """tf2onnx names the output after the function's return (output_0): give both kinds one name."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[0].name = name
    return proto


def keras_to_onnx(model, input_shape: Sequence[int], opset: int = OPSET):
    """tf2onnx from a tf.function of the model at inference (dropout and augmentation layers inactive)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *[int(s) for s in input_shape]), tf.float32, name=INPUT_NAME),)
    fn = tf.function(lambda image: model(image, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    return _rename_output(proto, OUTPUT_NAME)


def scratch_to_onnx(net, opset: int = OPSET):
    """A cxr.nn Network as an ONNX graph, layer by layer (float32; float64 networks are checked like any other).

    Layout is tracked: the input is NHWC, Conv/MaxPool need NCHW, Flatten needs NHWC again (its feature
    order is Keras' row-major (H, W, C))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cxr.nn import layers as L

    nodes, inits = [], []
    state = {"name": INPUT_NAME, "layout": "nhwc", "n": 0}

    def fresh(prefix: str) -> str:
        state["n"] += 1
        return f"{prefix}_{state['n']}"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def op(kind: str, inputs: list[str], **attrs) -> str:
        out = fresh(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        state["name"] = out
        return out

    def to(layout: str) -> None:
        if state["layout"] == layout:
            return
        if (state["layout"], layout) == ("nhwc", "nchw"):
            op("Transpose", [state["name"]], perm=[0, 3, 1, 2])
        elif (state["layout"], layout) == ("nchw", "nhwc"):
            op("Transpose", [state["name"]], perm=[0, 2, 3, 1])
        else:
            raise OnnxExportError(f"cannot bring a {state['layout']} tensor to {layout}")
        state["layout"] = layout

    def conv(layer, kernel: np.ndarray, group: int) -> None:
        to("nchw")
        kh, kw = layer.kernel_size
        if layer.padding == "same":  # TF's 'same': the odd pixel goes at the end
            (t, b), (lft, r) = L._same_pads(kh), L._same_pads(kw)
        else:
            t = b = lft = r = 0
        i = len(nodes)
        inputs = [state["name"], const(f"W{i}", kernel)]
        if layer.use_bias:
            inputs.append(const(f"B{i}", layer.params["bias"]))
        op("Conv", inputs, kernel_shape=[kh, kw], strides=[1, 1], pads=[t, lft, b, r], group=group)

    for layer in net.layers:
        if isinstance(layer, L.Conv2D):
            conv(layer, layer.params["kernel"].transpose(3, 2, 0, 1), 1)         # (kh,kw,in,out)->(out,in,kh,kw)
        elif isinstance(layer, L.DepthwiseConv2D):
            k = layer.params["kernel"]                                             # (kh, kw, C, M)
            kh, kw, c, m = k.shape                                                 # out channel c*M + m, as TF
            conv(layer, k.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw), c)
        elif isinstance(layer, L.MaxPool2D):
            to("nchw")
            op("MaxPool", [state["name"]], kernel_shape=list(layer.pool_size), strides=list(layer.pool_size))
        elif isinstance(layer, L.Flatten):
            to("nhwc")
            op("Flatten", [state["name"]], axis=1)
            state["layout"] = "flat"
        elif isinstance(layer, L.Dense):
            if state["layout"] != "flat":
                raise OnnxExportError("Dense on a non-flat tensor: the network has no Flatten before it")
            i = len(nodes)
            w = const(f"W{i}", layer.params["kernel"])                             # (in, out): A @ W
            if layer.use_bias:
                op("Gemm", [state["name"], w, const(f"B{i}", layer.params["bias"])])
            else:
                op("MatMul", [state["name"], w])
        elif isinstance(layer, L.ReLU):
            op("Relu", [state["name"]])
        elif isinstance(layer, L.Softmax):
            if state["layout"] == "nchw":
                to("nhwc")
            op("Softmax", [state["name"]], axis=-1)
        else:
            raise OnnxExportError(f"no ONNX export for cxr.nn layer {type(layer).__name__}")
    if state["layout"] == "nchw":
        to("nhwc")
    if not net._fused():  # predict_proba applies a softmax when the network does not end with one
        op("Softmax", [state["name"]], axis=-1)
    nodes.append(helper.make_node("Identity", [state["name"]], [OUTPUT_NAME], name="output"))

    h, w, c = net.input_shape
    out_shape = ["N", *[int(s) for s in net.output_shape]]
    graph = helper.make_graph(
        nodes, "cxr_nn", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", h, w, c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, out_shape)], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="cxr.models.onnx_export", ir_version=IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def measure_throughput(predictor: store.Predictor, x: np.ndarray, min_seconds: float = 3.0) -> dict:
    """Images per second of wall time and per CPU second (core-second) of this process, after one warm-up
    call; for comparing engines at one thread each (bench scripts reuse it)."""
    predictor.predict_proba(x)
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < min_seconds:
        predictor.predict_proba(x)
        n += len(x)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s": round(n / wall, 1), "images_per_core_s": round(n / cpu, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export saved cxr models to model.onnx (checked against them).")
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="a model folder (or a folder of models, as jobs/train.py --out writes)")
    parser.add_argument("--data", help="check on this preprocess output's split instead of a random batch")
    parser.add_argument("--split", default="val", help="split of --data to check on (default val)")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest |difference| of probabilities allowed")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    dirs: list[Path] = []
    for arg in args.model_dirs:
        p = Path(arg)
        try:
            store.model_kind(p)
            dirs.append(p)
        except FileNotFoundError:
            found = store.list_models(p) if p.is_dir() else []
            if not found:
                print(f"{p}: not a model folder, nor a folder of models", file=sys.stderr)
                return 2
            dirs.extend(found)
    images = None
    if args.data:
        from cxr.data.loader import load_split

        images = load_split(args.data, args.split).x
    failed = 0
    for d in dirs:
        try:
            path = export_onnx(d, images, atol=args.atol)
        except (OnnxExportError, FileNotFoundError) as exc:
            print(f"FAILED {d}: {exc}", file=sys.stderr)
            failed += 1
            continue
        rec = store.read_metadata(d)["onnx"]
        print(f"{path}: max |diff| {rec['max_abs_diff']:.2g} on {rec['checked_on']} images, {rec['export_s']:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
