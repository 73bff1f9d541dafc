"""Export a saved model to model.onnx beside it, checked against the model itself before it is kept.

Why: ONNX Runtime runs the same network on the executors without TensorFlow (a smaller executor
environment, a faster start per Python worker, and faster CPU inference). The export runs on the driver:

- Keras models (model.keras) are written layer by layer at opset 17 (keras_sequential_to_onnx: the layers
  cxr.models.keras_models builds); any other Keras model goes through tf2onnx.convert.from_function, which
  holds dozens of copies of the weights while it converts (+2.9 GB for the study CNN at 224 px);
- cxr.nn scratch models (model.json + model.npz) are written operator by operator with onnx.helper. cxr.nn
  is NHWC like Keras while ONNX's Conv and MaxPool are NCHW: the graph transposes in before the first
  convolution and back before Flatten, so Flatten and the Dense kernels see Keras' (H, W, C) feature order.

- seed ensembles (store.ENSEMBLE_FILE) export each member as above (each checked) and then merge the members'
  graphs into one, every name prefixed per member, the shared input fed to all and an ONNX Mean of their
  outputs: the executors run one graph and need nothing ensemble-specific.

All graphs take float32 (N, H, W, 1) images in [0, 1] named "image" and return (N, 3) probabilities named
"proba" (output 0) and (N, D) "features", the out-of-distribution features (store.FEATURE_RULE): the activations
of every convolution block (the input of each max-pooling layer, GlobalAveragePool) and of every hidden Dense
(the input of each Dense but the first), concatenated, the penultimate (the final Dense's input) last; the block
sizes are in the graph's metadata (store.FEATURE_LAYERS_KEY, one list per member). An ensemble concatenates its
members' features along axis 1, member order. cxr.scope.ood later adds a third output, "ood_distance", when it
fits the model's out-of-distribution reference (ood.npz; re-added here when the folder has one). A scratch model's
area resize to its own input size stays outside the graph, in numpy (Predictor._resize), exactly as the scratch
predictor does it.

Before model.onnx is kept, the model and ONNX Runtime run on the given images (the val split in training)
or a fixed seeded random batch; a max |difference| of probabilities above `atol`, or of features above
`features_rtol` x max(1, max |feature|), raises OnnxExportError and leaves no new model.onnx. metrics.json
records the check under "onnx".

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
from cxr.scope.reference import Reference, distances, layer_groups, load_reference, relative_error

OPSET = 17
IR_VERSION = 8            # the IR version that goes with opset 17: any ONNX Runtime since 1.13 reads it
INPUT_NAME = "image"
OUTPUT_NAME = store.PROBA_OUTPUT          # "proba"
FEATURES_NAME = store.FEATURES_OUTPUT     # "features"
DISTANCE_NAME = store.DISTANCE_OUTPUT     # "ood_distance" (add_distance_to_onnx, once a reference is fitted)
DISTANCE_RTOL = 1e-4      # ONNX vs NumPy distance: max |diff| / max(distance, 1)
FEATURES_RTOL = 1e-4      # features may differ by this much x max(1, largest |feature|): they are unbounded
                          # sums (a Dense over 86 k inputs at 224 px), unlike probabilities in [0, 1]
MAX_CHECK_IMAGES = 512    # the check runs on at most this many of the given images (bounds export time)
RANDOM_CHECK_IMAGES = 16  # without images: a seeded uniform [0, 1) batch of this size
CHECK_BATCH = 16          # images per call in the check: Keras' eager activations for 64 images at 224 px
                          # took +1.3 GB of driver RSS, more than training itself at batch 32


class OnnxExportError(ValueError):
    """The exported graph does not reproduce the model (or the model has a layer the exporter lacks)."""


def export_onnx(model_dir: str | Path, val_images: np.ndarray | None = None, atol: float = 1e-5,
                max_images: int = MAX_CHECK_IMAGES, images_from: str | None = None,
                features_rtol: float = FEATURES_RTOL) -> Path:
    """Write model_dir/model.onnx for the saved model in model_dir and record the check in metrics.json.

    val_images: float32 (N, H, W, 1) in [0, 1] at the data size, as fed to the model (None or empty: a seeded
    random batch), the first max_images of them used; images_from says what they are, for the record.
    Raises OnnxExportError if ONNX Runtime's probabilities differ by more than atol, or its features by more
    than features_rtol x max(1, max |feature|). A folder with an OOD reference (ood.npz) gets its
    "ood_distance" output back (add_distance_to_onnx, checked too)."""
    d = Path(model_dir)
    t0 = time.perf_counter()
    source = store.load_predictor(d, engine="keras", batch_size=CHECK_BATCH)
    x = check_images(source, val_images, max_images)
    if source.kind == "ensemble":
        members = store.ensemble_members(d)
        for m in members:
            if FEATURES_NAME not in onnx_outputs(m / store.ONNX_FILE):  # missing, or exported before features
                export_onnx(m, val_images, atol=atol, max_images=max_images, images_from=images_from,
                            features_rtol=features_rtol)
        proto = ensemble_to_onnx([m / store.ONNX_FILE for m in members])
    elif source.kind == "keras":
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
        want_p, want_f = source._proba_and_features(x)   # the model's own framework: features_of's oracle
        got_p, got_f = exported.run_outputs(x, [OUTPUT_NAME, FEATURES_NAME])
        del exported
        diff = max_abs_diff(want_p, got_p)
        if not diff <= atol:  # also catches NaN
            raise OnnxExportError(f"{d}: ONNX Runtime's probabilities differ from the {source.kind} model's by "
                                  f"max |diff| = {diff:.3g} > atol {atol:g} on {len(x)} images: model.onnx not "
                                  "written (score/evaluate with --engine keras, or report the model's layers)")
        f_diff = max_abs_diff(want_f, got_f)
        f_scale = max(1.0, float(np.max(np.abs(want_f)))) if want_f.size else 1.0
        if not f_diff <= features_rtol * f_scale:
            raise OnnxExportError(f"{d}: ONNX Runtime's features differ from the {source.kind} model's by max "
                                  f"|diff| = {f_diff:.3g} > {features_rtol:g} x {f_scale:.3g} on {len(x)} images: "
                                  "model.onnx not written")
        os.replace(tmp, d / store.ONNX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = store.read_metadata(d)
    meta["onnx"] = {"file": store.ONNX_FILE, "opset": OPSET, "max_abs_diff": diff, "atol": atol,
                    "features_max_abs_diff": f_diff, "features_tol": features_rtol * f_scale,
                    "features_dims": int(want_f.shape[1]), "features_layers": feature_layers(proto),
                    "checked_on": int(len(x)), "checked_with": (images_from or "images given") if _has(val_images) else
                    f"seeded uniform random batch (seed 0, {len(x)} images)", "source": source.kind,
                    "input": INPUT_NAME, "output": OUTPUT_NAME, "outputs": [OUTPUT_NAME, FEATURES_NAME],
                    "versions": _versions(source.kind), "export_s": round(time.perf_counter() - t0, 3)}
    files = [f for f in meta.get("files") or [] if f not in (store.ONNX_FILE, store.METRICS_FILE)]
    meta["files"] = [*files, store.ONNX_FILE, store.METRICS_FILE]
    store.write_metadata(d, meta)
    if (d / store.OOD_FILE).is_file():  # a re-export keeps the model's OOD output (same reference, checked again)
        ref = load_reference(d)
        dims = int(want_f.shape[1])
        if ref.dims == dims and np.array_equal(ref.groups, layer_groups(feature_layers(proto), dims)):
            add_distance_to_onnx(d, x, images_from=meta["onnx"]["checked_with"])
        else:   # fitted on other features (a model exported before the layered features): stale, removed
            import warnings

            (d / store.OOD_FILE).unlink()
            meta = store.read_metadata(d)
            meta.pop("ood", None)
            meta["files"] = [f for f in meta.get("files") or [] if f != store.OOD_FILE]
            store.write_metadata(d, meta)
            warnings.warn(f"{d}: its OOD reference was fitted on {ref.dims} features in {ref.layers} layer(s), the "
                          f"new model.onnx has {dims} in {len((feature_layers(proto) or [[0]])[0])}: reference "
                          f"removed, fit it again with `python -m cxr.scope.ood fit {d} --data PRE_OUT`")
    return d / store.ONNX_FILE


def onnx_outputs(path: str | Path) -> list[str]:
    """Output names of an ONNX file ([] when it does not exist)."""
    if not Path(path).is_file():
        return []
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


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
    for pkg in ("onnx", "onnxruntime", *(("tf2onnx", "tensorflow-cpu") if kind in ("keras", "ensemble") else ())):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _rename_output(proto, name: str, index: int = 0):
    """tf2onnx names the outputs after the function's returns (output_0, ...): give every kind one name."""
    old = proto.graph.output[index].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[index].name = name
    return proto


def set_feature_layers(proto, layers: Sequence[Sequence[int]]) -> None:
    """Record the feature block sizes (one list per member) in the graph's metadata (store.FEATURE_LAYERS_KEY):
    cxr.scope.ood fits one Mahalanobis distance per block."""
    import json

    kept = [p for p in proto.metadata_props if p.key != store.FEATURE_LAYERS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = store.FEATURE_LAYERS_KEY, json.dumps([[int(v) for v in m] for m in layers])


def feature_layers(proto) -> list[list[int]] | None:
    import json

    raw = next((p.value for p in proto.metadata_props if p.key == store.FEATURE_LAYERS_KEY), None)
    return json.loads(raw) if raw else None


def keras_to_onnx(model, input_shape: Sequence[int], opset: int = OPSET):
    """The model's layers written directly (keras_sequential_to_onnx: one copy of the weights in memory) or,
    for anything it does not write, tf2onnx from a tf.function of the model at inference (dropout and
    augmentation layers inactive) returning the probabilities and the final Dense's input
    (store.keras_outputs_model)."""
    try:
        return keras_sequential_to_onnx(model, opset)
    except OnnxExportError:
        pass
    import tensorflow as tf
    import tf2onnx

    both = store.keras_outputs_model(model)
    spec = (tf.TensorSpec((None, *[int(s) for s in input_shape]), tf.float32, name=INPUT_NAME),)
    fn = tf.function(lambda image: tuple(both(image, training=False)))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    if len(proto.graph.output) != 2:
        raise OnnxExportError(f"tf2onnx returned {len(proto.graph.output)} outputs, expected probabilities and "
                              "features")
    _rename_output(proto, OUTPUT_NAME, 0)
    _rename_output(proto, FEATURES_NAME, 1)
    set_feature_layers(proto, [store.keras_feature_layers(model)])
    return proto


def keep_outputs(graph, names: Sequence[str]) -> None:
    """Drop (in place) the graph's other outputs and every node and initializer only they needed."""
    outputs = [o for o in graph.output if o.name in names]
    if [o.name for o in outputs] != list(names):
        raise OnnxExportError(f"graph {graph.name}: outputs {[o.name for o in graph.output]} lack some of "
                              f"{list(names)}")
    def inputs(node):  # a control-flow node's subgraphs may read outer names too
        yield from (i for i in node.input if i)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in sub.node:
                    yield from inputs(inner)

    needed, kept = set(names), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(inputs(node))
    kept.reverse()
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.extend(outputs)


def ensemble_to_onnx(member_files: Sequence[str | Path], opset: int = OPSET):
    """One graph from the members' model.onnx files: each member's names prefixed m<i>_ (its input excepted,
    which all share), then Mean over the members' probabilities ("proba") and Concat (axis 1, member order) of
    their "features". A member's own "ood_distance" (if any) is left out. Members must share the input shape."""
    import onnx
    from onnx import TensorProto, helper

    graphs = [onnx.load(str(f)) for f in member_files]
    if not graphs:
        raise OnnxExportError("an ensemble needs at least one member")
    nodes, inits, outputs, features, dims, layers = [], [], [], [], [], []
    for i, proto in enumerate(graphs):
        g = proto.graph
        names = [o.name for o in g.output]
        if [v.name for v in g.input if v.name not in {t.name for t in g.initializer}] != [INPUT_NAME] or \
                names[:2] != [OUTPUT_NAME, FEATURES_NAME] or set(names[2:]) - {DISTANCE_NAME}:
            raise OnnxExportError(f"member {member_files[i]}: expected one input {INPUT_NAME!r} and outputs "
                                  f"{OUTPUT_NAME!r}, {FEATURES_NAME!r}, got {names} (re-export the member)")
        keep_outputs(g, [OUTPUT_NAME, FEATURES_NAME])
        dim = g.output[1].type.tensor_type.shape.dim
        dims.append(dim[1].dim_value if len(dim) == 2 and dim[1].HasField("dim_value") else None)
        layers.extend(feature_layers(proto) or ([[dims[-1]]] if dims[-1] else []))
        if {n.domain for n in g.node} - {"", "ai.onnx"} or len(g.sparse_initializer) or len(proto.functions):
            raise OnnxExportError(f"member {member_files[i]} uses custom domains or functions: cannot merge it")
        prefix = f"m{i}_"
        rename = (lambda name, p=prefix: name if name in ("", INPUT_NAME) else p + name)
        for t in g.initializer:
            t.name = rename(t.name)
            inits.append(t)
        for node in g.node:
            node.name = rename(node.name) if node.name else ""
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            for attr in node.attribute:  # subgraphs (If/Loop) would need renaming inside: refuse them
                if attr.g.node or len(attr.graphs):
                    raise OnnxExportError(f"member {member_files[i]} has control flow: cannot merge it")
            nodes.append(node)
        outputs.append(prefix + OUTPUT_NAME)
        features.append(prefix + FEATURES_NAME)
    nodes.append(helper.make_node("Concat", features, [FEATURES_NAME], name="ensemble_features", axis=1))
    nodes.append(helper.make_node("Mean", outputs, [OUTPUT_NAME], name="ensemble_mean"))
    first = graphs[0].graph
    inp = [v for v in first.input if v.name == INPUT_NAME]
    total = sum(dims) if all(v is not None for v in dims) else "D"
    out = [first.output[0], helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["N", total])]
    graph = helper.make_graph(nodes, "cxr_ensemble", inp, out, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="cxr.models.onnx_export", ir_version=IR_VERSION)
    if len(layers) == len(graphs):
        set_feature_layers(proto, layers)
    onnx.checker.check_model(proto)
    return proto


class _Graph:
    """An ONNX graph written layer by layer from the NHWC input "image", tracking the layout of the current
    tensor: Conv/MaxPool/GlobalAveragePool need NCHW, Flatten needs NHWC again (its feature order is Keras'
    row-major (H, W, C)), Dense needs a flat tensor."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.name, self.layout, self.n = INPUT_NAME, "nhwc", 0
        self.taps: list[tuple[str, str, int]] = []   # (kind, tensor, dims) of the features (store.FEATURE_RULE)
        self.channels = None                           # of the latest convolution

    def const(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"W{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def op(self, kind: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        self.n += 1
        out = f"{kind.lower()}_{self.n}"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        self.name = out
        return out

    def to(self, layout: str) -> None:
        if self.layout == layout:
            return
        if (self.layout, layout) == ("nhwc", "nchw"):
            self.op("Transpose", [self.name], perm=[0, 3, 1, 2])
        elif (self.layout, layout) == ("nchw", "nhwc"):
            self.op("Transpose", [self.name], perm=[0, 2, 3, 1])
        else:
            raise OnnxExportError(f"cannot bring a {self.layout} tensor to {layout}")
        self.layout = layout

    def conv(self, kernel_oihw: np.ndarray, bias: np.ndarray | None, pads: list[int], group: int = 1) -> None:
        self.to("nchw")
        kh, kw = kernel_oihw.shape[2:]
        inputs = [self.name, self.const(kernel_oihw)] + ([self.const(bias)] if bias is not None else [])
        self.op("Conv", inputs, kernel_shape=[int(kh), int(kw)], strides=[1, 1], pads=pads, group=int(group))
        self.channels = int(kernel_oihw.shape[0])

    def maxpool(self, size, strides) -> None:
        self.to("nchw")
        if self.channels is None:
            raise OnnxExportError("max-pooling before any convolution: unknown channel count")
        from onnx import helper

        tap = f"gap_{len(self.taps)}"   # the block's activations averaged over H and W: (N, C)
        # GlobalAveragePool + Flatten, not ReduceMean(axes 2, 3): 0.4 vs 0.9 ms per image for the bench's ensemble
        self.nodes += [helper.make_node("GlobalAveragePool", [self.name], [tap + "_nc11"], name=tap + "_pool"),
                       helper.make_node("Flatten", [tap + "_nc11"], [tap], name=tap, axis=1)]
        self.taps.append(("gap", tap, self.channels))
        self.op("MaxPool", [self.name], kernel_shape=[int(v) for v in size], strides=[int(v) for v in strides])

    def flatten(self) -> None:
        self.to("nhwc")
        self.op("Flatten", [self.name], axis=1)
        self.layout = "flat"

    def dense(self, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        if self.layout != "flat":
            raise OnnxExportError("Dense on a non-flat tensor: the network has no Flatten before it")
        self.taps.append(("flat", self.name, int(kernel.shape[0])))
        w = self.const(kernel)                                                      # (in, out): A @ W
        if bias is not None:
            self.op("Gemm", [self.name, w, self.const(bias)])
        else:
            self.op("MatMul", [self.name, w])

    def softmax(self) -> None:
        if self.layout == "nchw":
            self.to("nhwc")
        self.op("Softmax", [self.name], axis=-1)

    def model(self, input_shape, output_shape, graph_name: str, opset: int = OPSET):
        import onnx
        from onnx import TensorProto, helper

        if self.layout == "nchw":
            self.to("nhwc")
        dense = [t for t in self.taps if t[0] == "flat"]
        if not dense:
            raise OnnxExportError("no Dense layer: the graph has no penultimate features to return")
        drop = dense[0] if len(dense) > 1 else None     # the first Dense's input (the flattened image or blocks)
        taps = [t for t in self.taps if t is not drop]
        self.nodes.append(helper.make_node("Identity", [self.name], [OUTPUT_NAME], name="output"))
        self.nodes.append(helper.make_node("Concat", [t[1] for t in taps], [FEATURES_NAME], name="features", axis=1)
                          if len(taps) > 1 else helper.make_node("Identity", [taps[0][1]], [FEATURES_NAME],
                                                                 name="features"))
        layers = [t[2] for t in taps]
        h, w, c = [int(v) for v in input_shape]
        graph = helper.make_graph(
            self.nodes, graph_name, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", h, w, c])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", *[int(v) for v in output_shape]]),
             helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["N", sum(layers)])],
            initializer=self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="cxr.models.onnx_export", ir_version=IR_VERSION)
        set_feature_layers(proto, [layers])
        onnx.checker.check_model(proto, full_check=True)
        return proto


def _pads(padding: str, kh: int, kw: int) -> list[int]:
    """ONNX pads [top, left, bottom, right] for Keras' 'valid' or stride-1 'same' (odd pixel at the end)."""
    from cxr.nn import layers as L

    if padding == "same":
        (t, b), (lft, r) = L._same_pads(kh), L._same_pads(kw)
        return [t, lft, b, r]
    return [0, 0, 0, 0]


# identity at inference: left out of the graph
KERAS_PASSTHROUGH = ("InputLayer", "Dropout", "RandomTranslation", "RandomRotation", "RandomZoom")


def keras_sequential_to_onnx(model, opset: int = OPSET):
    """The Keras models of cxr.models.keras_models written operator by operator (as scratch_to_onnx does),
    without tf2onnx: tf2onnx held ~60 copies of the weights while converting (+2.9 GB of driver RSS for the
    study CNN at 224 px, 11 M parameters), this holds one. Raises OnnxExportError on anything else (a layer,
    an activation, strides or dilations it does not write): keras_to_onnx then falls back to tf2onnx."""
    import keras

    if not isinstance(model, keras.Sequential):
        raise OnnxExportError("not a keras.Sequential model")
    g = _Graph()

    def activation(layer) -> None:
        name = getattr(getattr(layer, "activation", None), "__name__", "linear")
        if name == "relu":
            g.op("Relu", [g.name])
        elif name == "softmax":
            g.softmax()
        elif name != "linear":
            raise OnnxExportError(f"{layer.name}: no ONNX export for activation {name!r}")

    def plain(layer) -> None:
        if tuple(getattr(layer, "strides", (1, 1))) != (1, 1) or \
                tuple(getattr(layer, "dilation_rate", (1, 1))) != (1, 1):
            raise OnnxExportError(f"{layer.name}: only stride 1, dilation 1 convolutions are written directly")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise OnnxExportError(f"{layer.name}: channels_first")

    for layer in model.layers:
        kind = type(layer).__name__
        if kind in KERAS_PASSTHROUGH:
            continue
        if kind == "Conv2D":
            plain(layer)
            if layer.groups != 1:
                raise OnnxExportError(f"{layer.name}: grouped convolution")
            k = layer.kernel.numpy()                                                 # (kh, kw, in, out)
            g.conv(k.transpose(3, 2, 0, 1), layer.bias.numpy() if layer.use_bias else None,
                   _pads(layer.padding, *k.shape[:2]))
            activation(layer)
        elif kind == "SeparableConv2D":
            plain(layer)
            dk = layer.depthwise_kernel.numpy()                                      # (kh, kw, C, M)
            kh, kw, c, m = dk.shape
            g.conv(dk.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw), None, _pads(layer.padding, kh, kw), group=c)
            pk = layer.pointwise_kernel.numpy()                                      # (1, 1, C*M, out)
            g.conv(pk.transpose(3, 2, 0, 1), layer.bias.numpy() if layer.use_bias else None, [0, 0, 0, 0])
            activation(layer)
        elif kind == "MaxPooling2D":
            if layer.padding != "valid" or getattr(layer, "data_format", "channels_last") != "channels_last":
                raise OnnxExportError(f"{layer.name}: only 'valid' channels-last pooling is written directly")
            g.maxpool(layer.pool_size, layer.strides or layer.pool_size)
        elif kind == "GlobalAveragePooling2D":
            if getattr(layer, "keepdims", False) or layer.data_format != "channels_last":
                raise OnnxExportError(f"{layer.name}: keepdims or channels_first")
            g.to("nchw")
            g.op("GlobalAveragePool", [g.name])
            g.op("Flatten", [g.name], axis=1)
            g.layout = "flat"
        elif kind == "Flatten":
            g.flatten()
        elif kind == "Dense":
            g.dense(layer.kernel.numpy(), layer.bias.numpy() if layer.use_bias else None)
            activation(layer)
        else:
            raise OnnxExportError(f"no direct ONNX export for Keras layer {kind}")
    return g.model(model.input_shape[1:], model.output_shape[1:], model.name or "keras", opset)


def scratch_to_onnx(net, opset: int = OPSET):
    """A cxr.nn Network as an ONNX graph, layer by layer (float32; float64 networks are checked like any other).
    Layout is tracked as in _Graph."""
    from cxr.nn import layers as L

    g = _Graph()
    for layer in net.layers:
        if isinstance(layer, L.Conv2D):
            kh, kw = layer.kernel_size
            g.conv(layer.params["kernel"].transpose(3, 2, 0, 1),                    # (kh,kw,in,out)->(out,in,kh,kw)
                   layer.params["bias"] if layer.use_bias else None, _pads(layer.padding, kh, kw))
        elif isinstance(layer, L.DepthwiseConv2D):
            k = layer.params["kernel"]                                             # (kh, kw, C, M)
            kh, kw, c, m = k.shape                                                 # out channel c*M + m, as TF
            g.conv(k.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw), layer.params["bias"] if layer.use_bias
                   else None, _pads(layer.padding, kh, kw), group=c)
        elif isinstance(layer, L.MaxPool2D):
            g.maxpool(layer.pool_size, layer.pool_size)
        elif isinstance(layer, L.Flatten):
            g.flatten()
        elif isinstance(layer, L.Dense):
            g.dense(layer.params["kernel"], layer.params["bias"] if layer.use_bias else None)
        elif isinstance(layer, L.ReLU):
            g.op("Relu", [g.name])
        elif isinstance(layer, L.Softmax):
            g.softmax()
        else:
            raise OnnxExportError(f"no ONNX export for cxr.nn layer {type(layer).__name__}")
    if not net._fused():  # predict_proba applies a softmax when the network does not end with one
        g.softmax()
    return g.model(net.input_shape, net.output_shape, "cxr_nn", opset)


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


# ------------------------------------------------------------------ the OOD distance (cxr.scope.reference)
def _distance_nodes(graph, ref: Reference) -> None:
    """Append (in place), per layer g: Gather(its features) -> Sub(mean) -> MatMul(L) -> Mul(self) ->
    ReduceSum(axis 1) -> Sqrt -> Mul(1 / scale), then Sum over the layers: the "ood_distance" output, right after
    the node that makes "features" (so an ensemble's Mean stays the last node)."""
    from onnx import TensorProto, helper, numpy_helper

    names = [o.name for o in graph.output]
    if FEATURES_NAME not in names:
        raise ValueError(f"model.onnx has no {FEATURES_NAME!r} output (outputs: {names}): re-export it with "
                         "`python -m cxr.models.onnx_export MODEL_DIR` first")
    keep_outputs(graph, [n for n in names if n != DISTANCE_NAME])   # replace an older distance
    inits = [numpy_helper.from_array(np.asarray([1], np.int64), "ood_axes")]
    new, terms = [], []
    for g, factor in enumerate(ref.factors):
        i = np.flatnonzero(ref.groups == g)
        p = f"ood_l{g}_"
        inits += [numpy_helper.from_array(i.astype(np.int64), p + "index"),
                  numpy_helper.from_array(ref.mean[i].astype(np.float32), p + "mean"),
                  numpy_helper.from_array(factor.astype(np.float32), p + "factor"),
                  numpy_helper.from_array(np.asarray([1.0 / ref.scales[g]], np.float32), p + "inv_scale")]
        new += [helper.make_node("Gather", [FEATURES_NAME, p + "index"], [p + "features"], name=p + "gather", axis=1),
                helper.make_node("Sub", [p + "features", p + "mean"], [p + "centered"], name=p + "sub"),
                helper.make_node("MatMul", [p + "centered", p + "factor"], [p + "whitened"], name=p + "matmul"),
                helper.make_node("Mul", [p + "whitened", p + "whitened"], [p + "squared"], name=p + "square"),
                helper.make_node("ReduceSum", [p + "squared", "ood_axes"], [p + "sum"], name=p + "sum", keepdims=0),
                helper.make_node("Sqrt", [p + "sum"], [p + "distance"], name=p + "sqrt"),
                helper.make_node("Mul", [p + "distance", p + "inv_scale"], [p + "scaled"], name=p + "scale")]
        terms.append(p + "scaled")
    new.append(helper.make_node("Sum", terms, [DISTANCE_NAME], name="ood_layers_sum"))
    graph.initializer.extend(inits)
    at = next(i for i, node in enumerate(graph.node) if FEATURES_NAME in node.output) + 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + new + nodes[at:])
    graph.output.append(helper.make_tensor_value_info(DISTANCE_NAME, TensorProto.FLOAT, ["N"]))


def add_distance_to_onnx(model_dir: str | Path, images: np.ndarray | None = None, ref: Reference | None = None,
                         rtol: float = DISTANCE_RTOL, images_from: str | None = None) -> Path:
    """Rewrite model_dir/model.onnx with the "ood_distance" output of `ref` (default: the folder's ood.npz),
    checked before it is kept: on `images` (float32 (N, H, W, 1) at the data size; None: a seeded random batch)
    ONNX Runtime's distance must equal the NumPy distance of the graph's own features within `rtol`
    (relative_error). Raises ValueError otherwise, leaving model.onnx as it was. Records metrics.json "ood"."""
    import onnx

    d = Path(model_dir)
    ref = ref if ref is not None else load_reference(d)
    if ref is None:
        raise FileNotFoundError(f"{d / store.OOD_FILE} is missing: fit the reference first (python -m cxr.scope.ood fit)")
    proto = onnx.load(str(d / store.ONNX_FILE))
    _distance_nodes(proto.graph, ref)
    onnx.checker.check_model(proto)
    meta = store.read_metadata(d)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=store.ONNX_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(proto.SerializeToString())
        graph = store.OnnxPredictor(d, meta, batch_size=CHECK_BATCH, threads=1, onnx_path=tmp)
        x = check_images(graph, images, MAX_CHECK_IMAGES)
        feats, got = graph.run_outputs(x, [FEATURES_NAME, DISTANCE_NAME])
        del graph
        want = distances(feats, ref)
        err = relative_error(got, want)
        if not err <= rtol:  # also catches NaN
            raise ValueError(f"{d}: model.onnx's {DISTANCE_NAME} differs from the NumPy distance by {err:.3g} "
                             f"(max |diff| / max(distance, 1)) > {rtol:g} on {len(x)} images: model.onnx not "
                             "rewritten")
        os.replace(tmp, d / store.ONNX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = store.read_metadata(d)
    onnx_rec = meta.get("onnx") or {}
    if onnx_rec:
        onnx_rec["outputs"] = [o.name for o in proto.graph.output]
    meta["ood"] = {**(meta.get("ood") or {}), **ref.summary(), "onnx_output": DISTANCE_NAME,
                   "onnx_max_rel_diff": err, "onnx_rtol": rtol, "checked_on": int(len(x)),
                   "checked_with": (images_from or "images given") if images is not None and len(images)
                   else f"seeded uniform random batch (seed 0, {len(x)} images)"}
    files = [f for f in meta.get("files") or [] if f not in (store.OOD_FILE, store.ONNX_FILE, store.METRICS_FILE)]
    meta["files"] = [*files, store.OOD_FILE, store.ONNX_FILE, store.METRICS_FILE]
    store.write_metadata(d, meta)
    return d / store.ONNX_FILE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export saved cxr models to model.onnx (checked against them).")
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="a model folder (or a folder of models, as jobs/train.py --out writes)")
    parser.add_argument("--data", help="check on this preprocess output's split instead of a random batch")
    parser.add_argument("--split", default="val", help="split of --data to check on (default val)")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest |difference| of probabilities allowed")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        dirs = store.expand_model_dirs(args.model_dirs)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    images = None
    if args.data:
        from cxr.data.loader import load_split

        images = load_split(args.data, args.split, limit=MAX_CHECK_IMAGES).x  # all the check uses
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
