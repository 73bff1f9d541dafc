"""Per-image cost of the preprocess function with decode reduction off vs auto, on one core, without Spark.

Bytes are read into memory first; each image runs through cxr.image.pipeline.preprocess_bytes (decode, CLAHE,
brightness, resize: what the Spark workers call) `--repeats` times per setting and the least CPU time counts
(thread CPU time: other processes on a shared machine inflate it least). Inputs: the shared real X-rays
(JPEG and PNG, as they are) and synthetic 1024 px radiographs written both as JPEG and as PNG (same pixels).
Also reports how close the two settings' outputs are (correlation, mean |difference| in grey levels).

    python scripts/bench_decode_reduction.py [--real ../shared/data/cxr] [--every 1] [--synthetic 40] \
        [--size 224] [--resize-mode stretch]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cxr.common.bench import CACHE, fastest_cpu  # noqa: E402
from cxr.common.markdown import table  # noqa: E402
from cxr.image.pipeline import PreprocessParams, preprocess_bytes  # noqa: E402

OUT = CACHE / "decode-reduction.json"


def synthetic(n: int, size: int, seed: int = 0) -> dict[str, list[bytes]]:
    from cxr.datasets.synth import CLASSES, render_chest

    jpeg, png = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pixels = np.round(render_chest(CLASSES[i % 3], size, rng) * 255.0).astype(np.uint8)
        jpeg.append(cv2.imencode(".jpg", pixels)[1].tobytes())
        png.append(cv2.imencode(".png", pixels)[1].tobytes())
    return {f"synthetic {size} px JPEG": jpeg, f"synthetic {size} px PNG": png}


def real(folder: Path, every: int) -> dict[str, list[bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::every]
    groups: dict[str, list[bytes]] = {"real JPEG": [], "real PNG": []}
    for p in files:
        groups["real PNG" if p.suffix.lower() == ".png" else "real JPEG"].append(p.read_bytes())
    return groups


def cpu_ms(data: bytes, params: PreprocessParams, repeats: int) -> tuple[float, np.ndarray]:
    """The least thread CPU ms of `repeats` runs of one image, and its output."""
    out = []
    best = fastest_cpu(lambda: out.append(preprocess_bytes(data, params)[1]), repeats, clock=time.thread_time)
    return best * 1000.0, out[-1]


def measure(groups: dict[str, list[bytes]], size: int, repeats: int, resize_mode: str = "stretch") -> list[dict]:
    off = PreprocessParams(size=size, resize_mode=resize_mode, decode_reduction="off")
    auto = PreprocessParams(size=size, resize_mode=resize_mode, decode_reduction="auto")
    rows = []
    for name, files in groups.items():
        if not files:
            continue
        t_off, t_auto, corr, diff = [], [], [], []
        for data in files:
            a, img_off = cpu_ms(data, off, repeats)
            b, img_auto = cpu_ms(data, auto, repeats)
            t_off.append(a)
            t_auto.append(b)
            x, y = img_off.astype(np.float64).ravel(), img_auto.astype(np.float64).ravel()
            corr.append(float(np.corrcoef(x, y)[0, 1]))
            diff.append(float(np.abs(x - y).mean()))
        rows.append({"input": name, "images": len(files), "off_ms": round(statistics.median(t_off), 2),
                     "auto_ms": round(statistics.median(t_auto), 2),
                     "off_per_core_s": round(len(files) / (sum(t_off) / 1000), 1),
                     "auto_per_core_s": round(len(files) / (sum(t_auto) / 1000), 1),
                     "speedup": round(sum(t_off) / sum(t_auto), 2),
                     "corr_median": round(statistics.median(corr), 4), "corr_min": round(min(corr), 4),
                     "mean_abs_diff": round(statistics.mean(diff), 2)})
        print(rows[-1], flush=True)
    return rows


def rows_table(rows: list[dict], size: int) -> str:
    return "\n".join(table(
        [f"input ({size} px output)", "images", "ms/image off", "ms/image auto", "images/core-s off", "auto", "speed-up",
         "corr(off, auto) median / min", "mean abs diff"],
        [[r["input"], r["images"], r["off_ms"], r["auto_ms"], r["off_per_core_s"], r["auto_per_core_s"],
          f"{r['speedup']}x", f"{r['corr_median']} / {r['corr_min']}", r["mean_abs_diff"]] for r in rows]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "cxr"))
    p.add_argument("--every", type=int, default=1, help="take every n-th real file")
    p.add_argument("--synthetic", type=int, default=40, help="synthetic images per format")
    p.add_argument("--synthetic-size", type=int, default=1024)
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--resize-mode", default="stretch", help="stretch | pad | crop (the recommended profile: pad)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    groups = real(Path(args.real), args.every) if Path(args.real).is_dir() else {}
    groups.update(synthetic(args.synthetic, args.synthetic_size))
    rows = measure(groups, args.size, args.repeats, args.resize_mode)
    print(rows_table(rows, args.size))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"size": args.size, "resize_mode": args.resize_mode, "repeats": args.repeats,
                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
