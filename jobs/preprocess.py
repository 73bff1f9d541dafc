"""spark-submit jobs/preprocess.py --input DIR --output DIR [...]: X-ray archive -> clean Parquet."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cxr.cli import add_scope_flags, base_parser, run_job, scope_overrides  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--input", required=True, action="append",
                        help="folder of images (class folders optional); repeat it (or separate with commas) to "
                             "write several collections into one table")
    parser.add_argument("--output", required=True, help="output folder (images/, errors/, duplicates/, manifest.json)")
    parser.add_argument("--manifest", action="append",
                        help="CSV with patient_id and/or source, and sha256 or relative_path: splits by patient, "
                             "source per image; repeat it for several inputs")
    parser.add_argument("--size", type=int, help="output side in pixels")
    parser.add_argument("--method", choices=["clahe", "he", "none"], help="equalization")
    parser.add_argument("--clip-limit", type=float, help="CLAHE clip limit")
    parser.add_argument("--tile-grid", type=int, help="CLAHE tiles per side")
    parser.add_argument("--resize-mode", choices=["stretch", "pad", "crop"])
    parser.add_argument("--seed", type=int, help="split seed")
    parser.add_argument("--decode-reduction", choices=["off", "auto"], help="decode at 1/2-1/8 scale when large")
    parser.add_argument("--on-damaged", choices=["reject", "flag"], help="files the codec reports damaged")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_scope_flags(parser, ood=False)
    args = parser.parse_args(argv)
    overrides = {"preprocess.size": args.size, "preprocess.method": args.method,
                 "preprocess.clip_limit": args.clip_limit, "preprocess.tile_grid": args.tile_grid,
                 "preprocess.resize_mode": args.resize_mode, "preprocess.split.seed": args.seed,
                 "preprocess.decode_reduction": args.decode_reduction, "preprocess.on_damaged": args.on_damaged,
                 **scope_overrides(args)}

    def body(spark, config):
        from cxr.spark.preprocess import run

        result = run(spark, args.input, args.output, config, manifest=args.manifest, overwrite=args.overwrite)
        c = result["counts"]
        seconds = sum(result["timings_s"].values())
        print(f"preprocess: {c['input']} files -> {c['written']} images, {c['rejected']} rejected, "
              f"{c['out_of_scope']} out of scope, {c['duplicates']} duplicates in {seconds:.1f}s "
              f"({c['input'] / max(seconds, 1e-9):.1f} files/s); output {args.output}")

    return run_job(args, overrides, body)


if __name__ == "__main__":
    sys.exit(main())
