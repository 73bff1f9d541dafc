"""Ablation of the study's choices, one factor at a time, each row a grouped cross-validation.

    python scripts/ablation.py --input ../shared/data/cxr --manifest ../shared/data/cxr/MANIFEST.csv \
        --out out/ablation [--size 64] [--folds 3] [--seeds 1] [--epochs 8] [--rows baseline,he,...]

The baseline is this project's default pipeline at --size (CLAHE clip 2.0, brightness beta 10, stretch, no
augmentation, Keras CNN with Adam); every other row changes one thing. Every row sees the same images in the
same folds (the assignment depends only on labels, patients and seed), so rows are compared fold by fold:
a change "helped" or "hurt" only when a paired t-test on the per-fold macro-F1 differences says so at 5%. Each preprocessing variant is written once under OUT/data/<variant>, each row's cross-validation under
OUT/cv/<row>; both are reused when the script is run again (delete them to recompute). Writes
docs/ablation.md (--doc) and its plot.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row, what changes, preprocess overrides, train/crossval overrides)
ROWS = [
    ("baseline", "CLAHE 2.0 + brightness, stretch, no augmentation, Adam", {}, {}),
    ("he", "the study's global histogram equalisation instead of CLAHE", {"preprocess.method": "he"}, {}),
    ("no-equalisation", "no equalisation at all", {"preprocess.method": "none"}, {}),
    ("no-brightness", "brightness step off (beta 0)", {"preprocess.brightness.beta": 0}, {}),
    ("clip-1", "CLAHE clip limit 1.0", {"preprocess.clip_limit": 1.0}, {}),
    ("clip-4", "CLAHE clip limit 4.0", {"preprocess.clip_limit": 4.0}, {}),
    ("size-128", "128 x 128 images", {"preprocess.size": 128}, {}),
    ("size-224", "224 x 224 images (the study's)", {"preprocess.size": 224}, {}),
    ("pad", "resize by padding to square (aspect ratio kept)", {"preprocess.resize_mode": "pad"}, {}),
    ("crop", "resize by centre crop", {"preprocess.resize_mode": "crop"}, {}),
    ("augment", "random shifts / rotations / zooms while training", {}, {"train.augment.enabled": True}),
    ("rmsprop", "RMSprop instead of Adam", {}, {"crossval.optimizers": ["rmsprop"]}),
    ("sgd", "SGD instead of Adam", {}, {"crossval.optimizers": ["sgd"]}),
    ("adadelta", "Adadelta instead of Adam", {}, {"crossval.optimizers": ["adadelta"]}),
    ("adagrad", "Adagrad instead of Adam", {}, {"crossval.optimizers": ["adagrad"]}),
]
HEADLINE = ("accuracy", "macro_f1", "normal_vs_viral", "ece")


def variant_key(pre: dict) -> str:
    """A folder name for one preprocessing variant (rows that share preprocessing share the folder)."""
    return "default" if not pre else "-".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(pre.items()))


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.2))
    for offset, (metric, label, color) in enumerate([("macro_f1", "macro-F1", "tab:blue"),
                                                     ("normal_vs_viral", "NORMAL vs VIRAL acc.", "tab:orange")]):
        means = [r["summary"][metric]["mean"] for r in rows][::-1]
        sds = [r["summary"][metric]["sd"] for r in rows][::-1]
        ys = [i + (offset - 0.5) * 0.3 for i in range(len(rows))]
        ax.errorbar(means, ys, xerr=sds, fmt="o", color=color, label=label, capsize=2, ms=4)
    base = rows[0]["summary"]["macro_f1"]["mean"]
    ax.axvline(base, color="tab:blue", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names)
    ax.set_xlabel("mean ± sd over folds x seeds")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(s: dict | None) -> str:
    return "n/a" if not s or s.get("mean") is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"


def write_doc(rows: list[dict], args: argparse.Namespace, command: str, doc: Path, seconds: float) -> None:
    png = plot(rows, doc.with_suffix(".png"))
    base = rows[0]
    lines = [
        "# Ablation of the study's choices",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Data: `{args.input}` ({base['images']} labeled images, {base['groups']} patients/groups). Each row is a "
        f"grouped, class-stratified {args.folds}-fold cross-validation x {args.seeds} seed(s) of the Keras CNN, "
        f"{args.epochs} epochs, batch {base['batch_size']}, balanced class weights; every row uses the same folds. "
        f"Baseline: {base['what']} at {args.size} x {args.size}. Values are mean ± sd over the "
        f"{base['summary']['macro_f1']['n']} held-out folds; 'vs baseline' is the mean paired difference in "
        "macro-F1 ± its standard error, called helped/hurt only when a paired t-test over the folds rejects "
        "'no difference' at 5% (with 3 folds that needs a difference over 4.3 standard errors). "
        f"Cross-validation time {seconds / 60:.0f} min on this machine (2 cores; preprocessing not included).",
        "",
        "| row | change | accuracy | macro-F1 | NORMAL vs VIRAL | ECE | border-only acc. | vs baseline (macro-F1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, p = r["summary"], r["paired"]
        vs = "—" if r["row"] == "baseline" else (
            f"{p['mean']:+.3f} ± {p['se']:.3f} ({p['call']})" if p.get("se") is not None else "n/a")
        lines.append(f"| {r['row']} | {r['what']} | {fmt(s['accuracy'])} | {fmt(s['macro_f1'])} | "
                     f"{fmt(s['normal_vs_viral'])} | {fmt(s['ece'])} | {fmt(r.get('border_only'))} | {vs} |")
    meta = base.get("metadata_only")
    lines += ["", f"![macro-F1 and NORMAL-vs-VIRAL accuracy per row]({png.name})", "",
              "## What helped on this data", ""]
    helped = [r for r in rows[1:] if r["paired"].get("call") == "helped"]
    hurt = [r for r in rows[1:] if r["paired"].get("call") == "hurt"]
    neutral = [r for r in rows[1:] if r["paired"].get("call") not in ("helped", "hurt")]
    lines.append("- Helped: " + (", ".join(f"{r['row']} ({r['paired']['mean']:+.3f})" for r in helped) or "none") + ".")
    lines.append("- Hurt: " + (", ".join(f"{r['row']} ({r['paired']['mean']:+.3f})" for r in hurt) or "none") + ".")
    lines.append("- No difference the folds can resolve: " + (", ".join(r["row"] for r in neutral) or "none") + ".")
    study = {"he": "histogram equalisation (the study's, vs CLAHE)", "no-equalisation": "equalising at all",
             "no-brightness": "the brightness step", "size-224": "224 x 224 inputs (the study's size)",
             "pad": "padding to square instead of the study's stretching",
             "crop": "centre-cropping instead of the study's stretching"}
    for key, what in study.items():
        r = next((x for x in rows if x["row"] == key), None)
        if r and r["paired"].get("se") is not None:
            lines.append(f"- {what}: {r['row']} vs baseline {r['paired']['mean']:+.3f} ± {r['paired']['se']:.3f} "
                         f"macro-F1 ({r['paired']['call']}).")
    if meta:
        lines += ["", f"Shortcut check: a random forest on file metadata alone (size, format, colour mode) scores "
                      f"accuracy {fmt(meta.get('accuracy'))} and NORMAL-vs-VIRAL {fmt(meta.get('normal_vs_viral'))} "
                      f"on the same folds; the baseline CNN on the border band alone (lungs blanked) "
                      f"{fmt(base.get('border_only'))}."]
    lines += ["", f"Read with the settings in mind: every row trains {args.epochs} epochs with Keras' default "
              "learning rates, so changes that need longer training (augmentation, larger images, SGD, Adagrad and "
              "Adadelta at their small default rates) are judged at a disadvantage. These are differences on one "
              "small archive whose classes come from different sources; they do not carry over to other hospitals "
              "without being measured there.", ""]
    doc.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="raw archive with class folders")
    parser.add_argument("--manifest", help="CSV with patient ids (folds grouped by patient)")
    parser.add_argument("--out", required=True, help="work folder (preprocessed variants, per-row cross-validations)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ablation.md"), help="markdown to write")
    parser.add_argument("--size", type=int, default=64, help="baseline image side")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rows", help="comma list of row names (default: all)")
    parser.add_argument("--conf", help="a YAML profile layered over conf/default.yaml")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr.cli import setup_logging
    from cxr.config import load_config
    from cxr.evaluate.crossval import RESULT_FILE, paired
    from cxr.evaluate.crossval import run as crossval
    from cxr.spark.preprocess import run as preprocess
    from cxr.spark.session import get_spark

    setup_logging("INFO")
    log = logging.getLogger("ablation")
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else [r[0] for r in ROWS]
    unknown = set(wanted) - {r[0] for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(r[0] for r in ROWS)}")
    if "baseline" not in wanted:
        wanted.insert(0, "baseline")
    common = {"preprocess.size": args.size, "train.verbose": 0, "crossval.epochs": args.epochs,
              "crossval.models": ["cnn"], "crossval.optimizers": ["adam"]}
    out = Path(args.out)
    spark = get_spark(load_config(args.conf, common), master=args.master)
    results = []
    try:
        for name, what, pre, train in [r for r in ROWS if r[0] in wanted]:
            config = load_config(args.conf, {**common, **pre, **train})
            data = out / "data" / variant_key(pre)
            if not (data / "manifest.json").is_file():
                log.info("preprocessing variant %s", data.name)
                preprocess(spark, args.input, str(data), config, manifest=args.manifest, overwrite=True)
            cv = out / "cv" / name
            if not (cv / RESULT_FILE).is_file():
                log.info("cross-validating row %s (%s)", name, what)
                crossval(spark, str(data), str(cv), config, folds=args.folds, seeds=args.seeds, overwrite=True)
            result = json.loads((cv / RESULT_FILE).read_text())
            model = result["models"][0]
            results.append({"row": name, "what": what, "summary": result["summary"][model],
                            "runs": [r for r in result["runs"] if r["model"] == model],
                            "border_only": (result.get("probes") or {}).get(f"{model}/border_only", {}).get("accuracy"),
                            "metadata_only": (result.get("probes") or {}).get("metadata-only/full"),
                            "images": result["data"]["images"], "groups": result["data"]["groups"],
                            "batch_size": result["train"]["batch_size"], "seconds": result["timings_s"]["total"]})
    finally:
        spark.stop()
    for r in results:
        r["paired"] = paired(results[0]["runs"], r["runs"])
    doc = Path(args.doc)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    command = "python scripts/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_doc(results, args, command, doc, sum(r["seconds"] for r in results))
    print(f"ablation: {len(results)} rows -> {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
