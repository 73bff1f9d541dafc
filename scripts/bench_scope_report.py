"""The "## Scope gate and OOD" section of BENCHMARKS.md (and "## Measurement" of docs/scope_gate.md) from
scripts/bench_scope.py's measurements, so that `bench_scope.py --report-only` rewrites both without measuring."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from cxr.common.bench import CACHE, machine
from cxr.common.markdown import table

SECTION = "## Scope gate and OOD (scripts/bench_scope.py)"
# the bench's inputs, model and measurements (CXR_BENCH_SCOPE_WORK: another folder, for a second checkout)
WORK = Path(os.environ.get("CXR_BENCH_SCOPE_WORK") or CACHE / "scope")
BATCH = 32   # the model's batch in the score job and in the cost step


def pct(a: int, n: int) -> str:
    return f"{100 * a / n:.1f}% ({a}/{n})" if n else "n/a"


def frontal_paragraph(meta: dict | None) -> str:
    """What the frontal check is and where its threshold comes from (its frontal.json)."""
    if not meta:
        return "The frontal check was off in this run."
    counts = meta["training_set"]
    pos = sum(v for k, v in counts.items() if k.startswith("frontal_") or k == "synth_chest")
    seeds = meta.get("seeds") or [meta["seed"]]
    return (f"Frontal check (`cxr.scope.frontal`, conf `scope.frontal: builtin`): the mean of {len(seeds)} small CNNs "
            f"({meta['params']} weights in all) on the model's image at {meta['input_side']} px, trained with outlier "
            f"exposure by `python -m cxr.scope.frontal_train` (seeds {', '.join(map(str, seeds))}, {meta['epochs']} "
            f"epochs each) on {sum(counts.values())} images "
            f"made from the TRAIN films only ({', '.join(f'{k}: {v}' for k, v in meta['training_films'].items())}): "
            f"{pos} frontal (jittered copies, synthetic chests) and {sum(counts.values()) - pos} others (re-framed "
            "train films, rendered radiographs, pictures, MNIST train digits); threshold "
            f"**{meta['threshold']:.3f}** = the {100 * meta['threshold_quantile']:.1f}% quantile of its scores on "
            f"{meta['threshold_on']}. Its ONNX graph equals Keras within {meta['onnx_check']['max_abs_diff']:.1e}."
            + ("" if meta.get("asymmetry_threshold") is None else
               f" Beside it the mirror prior: an image whose halves mirror each other (asymmetry under "
               f"**{meta['asymmetry_threshold']:.3f}**, the {100 * meta['asymmetry_quantile']:.1f}% quantile of "
               f"{meta['asymmetry_on']}) is not a frontal chest film."))


def report(args, st: dict) -> str:
    from cxr.quality.out_of_scope import KINDS, MANIFEST

    kinds = {r["relative_path"]: r["kind"] for r in csv.DictReader(open(WORK / "material" / MANIFEST))}
    tr, sc, co = st["train"], st["score"], st["cost"]
    ood, inside, thr = tr["ood"], sc["inscope"]["files"], tr["ood"]["threshold"]
    shrink = ", ".join(f"{r['shrinkage']:.3f}" for r in ood["layers"])
    d_in = np.array([v["distance"] for v in inside.values() if v.get("distance") is not None])
    auroc = lambda d: float(np.mean(np.asarray(d)[None, :] > d_in[:, None]))  # noqa: E731 (P(farther than in-scope))
    lines = [SECTION, "", f"Measured {st['date']} on {machine()}; "
             f"{st['minutes']:.1f} min in all. Python {st['versions']['python']}, onnxruntime "
             f"{st['versions'].get('onnxruntime', '?')}, pydicom {st['versions'].get('pydicom', '?')}. Model: the "
             f"recommended profile (96 px `pad`, CNN + Adam, {tr.get('epochs', 10)} epochs, seed ensemble of {tr['ensemble']}) trained by "
             "`jobs/train.py` on both shared folders (cxr and cxr-adult, split by patient); its OOD reference: the "
             f"{ood['dims']} features of model.onnx in {len(ood['layers'])} layers of "
             f"{', '.join(str(r['dims']) for r in ood['layers'])} dims (each conv block's activations averaged over "
             "the image, then the penultimate activations; a layer pools that layer of every member), one Mahalanobis "
             "distance per layer (Ledoit-Wolf, shrinkage "
             f"{shrink}) "
             f"fitted on {ood['n_train']} train images, each divided by its median out-of-fold distance, summed; "
             f"threshold **{thr:.2f}** = the {100 * ood['quantile']:.1f}% quantile of {ood['n_calibration']} scores "
             f"({ood['threshold_on']}). Scored by `jobs/score.py` (raw files, scope.ood: flag, local[2]).", "",
             "", frontal_paragraph(sc.get("frontal")), "",
             "**In-scope films** (goal: <= 1% of the held-out films of both shared folders flagged):", ""]
    d = sc["parquet_distances"]["train"]
    rows = [["train, both folders (the reference's own images; preprocess Parquet, not scored)", len(d), "-",
             pct(sum(x > thr for x in d), len(d)), "-", "-", f"{np.median(d):.2f} / {max(d):.2f}"]]
    keys = sorted({k.split("/")[0] + "/" + k.split("/")[1] for k in inside})
    for key in [*keys, "cxr", "cxr-adult", None]:
        rs = [v for k, v in inside.items() if key is None or k == key or k.startswith(key + "/")]
        if not rs:
            continue
        d = [v["distance"] for v in rs if v.get("distance") is not None]
        sc_ = [v["scope"] for v in rs if v.get("scope") is not None]
        rows.append([f"**{key or 'all held-out films'}**" if key in (None, "cxr", "cxr-adult") else key, len(rs),
                     f"**{pct(sum('frontal' in v.get('by', []) for v in rs), len(rs))}**",
                     pct(sum("distance" in v.get("by", []) for v in rs), len(rs)),
                     f"**{pct(sum(v['outcome'] == 'ood' for v in rs), len(rs))}**",
                     f"{np.min(sc_):.3f}" if sc_ else "-", f"{np.median(d):.2f} / {max(d):.2f}" if d else "-"])
    lines += table(["films", "files", "flagged by the frontal check", "flagged by the distance", "flagged (either)",
                    "lowest frontal score", "median / max distance"], rows)
    flagged = sorted((k for k, v in inside.items() if "frontal" in v.get("by", [])),
                     key=lambda k: inside[k].get("scope") or 0)
    lines += ["", "Flagged by the frontal check: " + (", ".join(f"`{k}` ({inside[k]['scope']:.3f})" for k in flagged)
                                                      or "none") + ".", "",
              "**Out-of-scope material** (`cxr.quality.out_of_scope`; goal: >= 98% kept out). A file counts under "
              "each pixel signal that fired (the two columns can overlap); AUROC: the chance that a file of the kind "
              "lies farther than an in-scope held-out film.", ""]
    mat, groups = sc["material"]["files"], {"header-rule kinds (a, c)": [], "tag-less kinds (b, d, e)": [],
                                            "re-framed held-out films (f)": [], "rendered radiographs (g)": [],
                                            "all": []}
    group_of = {"a": 0, "c": 0, "b": 1, "d": 1, "e": 1, "f": 2, "g": 3}

    def row(name, group, rs):
        c = {o: sum(r["outcome"] == o for r in rs) for o in ("header", "ood", "decoder", "missed")}
        d = [r["distance"] for r in rs if r.get("distance") is not None]
        sc_ = [r["scope"] for r in rs if r.get("scope") is not None]
        return [name, group, len(rs), c["header"], sum("frontal" in r.get("by", []) for r in rs),
                sum("distance" in r.get("by", []) for r in rs), c["decoder"], c["missed"],
                f"**{pct(sum(c.values()) - c['missed'], len(rs))}**", f"{np.median(sc_):.3f}" if sc_ else "-",
                f"{np.median(d):.1f}" if d else "-", f"{auroc(d):.2f}" if d else "-"]
    rows = []
    for kind, spec in KINDS.items():
        rs = [mat.get(p, {"outcome": "absent"}) for p, k in kinds.items() if k == kind]
        if rs:
            rows.append(row(kind, spec.group, rs))
            groups["all"].extend(rs)
            groups[list(groups)[group_of[spec.group]]].extend(rs)
    lines += table(["kind", "group", "files", "header rules", "frontal check", "distance", "rejected by the decoder",
                    "missed (scored as in scope)", "**kept out**", "median frontal score", "median distance",
                    "AUROC (distance)"], rows + [row(f"**{name}**", "", rs) for name, rs in groups.items() if rs])
    d_out = [r["distance"] for r in groups["tag-less kinds (b, d, e)"] if r.get("distance") is not None]
    t95, t2 = np.quantile(d_out, 0.05), np.quantile(d_in, 0.98)
    lines += ["", f"The distance alone, on the tag-less kinds (b, d, e) against the held-out films of both folders: catching 95% "
              f"of them takes a threshold of "
              f"{t95:.2f}, which flags **{pct(sum(d > t95 for d in d_in), len(d_in))}** of the in-scope held-out "
              f"films; flagging <= 2% of those ({t2:.2f}) catches **{pct(sum(d > t2 for d in d_out), len(d_out))}** "
              "of those files." if t95 < t2 else "A threshold between "
              f"{t2:.2f} and {t95:.2f} would meet both goals on this material."]
    cal = tr.get("calibration") or []
    if cal:
        alt = [(q, float(np.quantile(cal, q))) for q in (0.99, 0.98, 0.95) if q < ood["quantile"]]
        lines += ["", "Other values of `scope.ood_quantile` (the threshold from the same calibration scores): " +
                  "; ".join(f"{q} gives {t:.2f}, which flags {pct(sum(d > t for d in d_in), len(d_in))} of the "
                            f"in-scope held-out films and catches {pct(sum(d > t for d in d_out), len(d_out))} of the "
                            "tag-less files" for q, t in alt) + "."]
    h = co["header_ms"]
    dist_ms = co["onnx_ms"]["with"] - co["onnx_ms"]["without"]
    lines += ["", f"**Cost per image, one core** (CPU; goals: header read and distance each < 5%, the frontal check "
              f"< 10% of the per-image score cost). Score cost: "
              f"read, sha256, scope gate, decode, CLAHE, 96 px, ONNX with the distance, the frontal check (batch "
              f"{BATCH}, 1 thread) "
              f"over the {co['files']} val + test files in one process: **{co['score_ms']:.1f} ms**.", "",
              *table(["step", "ms per image", "share of the score cost"], [
                  [f"header read (`HeaderReader.read`), {len(h)} DICOMs: mean (max)",
                   f"{np.mean(list(h.values())):.3f} ({max(h.values()):.3f})",
                   f"**{100 * np.mean(list(h.values())) / co['score_ms']:.2f}%** "
                   f"({100 * max(h.values()) / co['score_ms']:.2f}%)"],
                  *([label, f"{co['onnx_ms'][k]:.3f}", f"{100 * co['onnx_ms'][k] / co['score_ms']:.1f}%"]
                    for label, k in (("ONNX without the ood_distance output", "without"), ("ONNX with it", "with"))),
                  ["**the distance** (with - without)", f"{dist_ms:.3f}", f"**{100 * dist_ms / co['score_ms']:.2f}%**"],
                  *([["**the frontal check** (resize to 64 px + its ONNX graph + the mirror prior)",
                      f"{co['onnx_ms']['frontal']:.3f}",
                      f"**{100 * co['onnx_ms']['frontal'] / co['score_ms']:.2f}%** ("
                      f"{100 * co['onnx_ms']['frontal'] / co['onnx_ms']['with']:.0f}% of the model's ONNX cost)"]]
                    if "frontal" in co["onnx_ms"] else [])]),
              "",
              f"Header reads: the bytes in memory (the job reads them anyway), the {co['shared_dicoms']} DICOMs of "
              f"../shared/data/dicom and the {len(h) - co['shared_dicoms']} written ones (group c), 20 reads each. "
              f"ONNX: the {co['images']} val + test images repeated to >= 512 a round, the three graphs alternated. "
              f"Fastest of {args.rounds} rounds each. The score cost is that of JPEG/PNG files (a DICOM's decode costs "
              f"more), so the shares are upper bounds. Runs: preprocess {st['preprocess']['wall_s']:.0f} s, train "
              f"{tr['wall_s'] / 60:.1f} min ({tr['cpu_s'] / 60:.1f} CPU min), score in-scope "
              f"{sc['inscope']['wall_s']:.0f} s, score material {sc['material']['wall_s']:.0f} s.", "",
              f"Reproduce: `{st['command']}` (inputs, model and results cached in {WORK}; `--redo train score cost` "
              "retrains and measures again).", ""]
    return "\n".join(lines)
