"""python -m cxr.score.maintain PRED_DIR [--retention-hours H]: compact and vacuum a Delta PRED_DIR.

Holds PRED_DIR's lease while it works (exit 3 when a score run holds it), so a nightly schedule can run it after
the score job. Without maintenance the state table gains a file a night and every file a compaction replaced
stays on disk: plain-Parquet readers of PRED_DIR (not Delta readers) would then see rows twice until a vacuum."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid

from cxr.image.source import local_path
from cxr.score.delta_table import maintain
from cxr.score.lease import Lease, LeaseHeldError, LocalLeaseFiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the score job's PRED_DIR (score.table_format: delta)")
    parser.add_argument("--retention-hours", type=int,
                        help="vacuum files older than this that no newer version needs (default: the table's own, "
                             "7 days); 0 ends time travel to earlier versions")
    parser.add_argument("--lease-seconds", type=float, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if local_path(args.output) is not None:
        files = LocalLeaseFiles()
    else:
        from cxr.spark.fs import FsLeaseFiles   # pyarrow only: no Spark session is started

        files = FsLeaseFiles()
    out = args.output.rstrip("/")
    try:
        with Lease(files, out, f"maintain-{uuid.uuid4().hex[:8]}", args.lease_seconds):
            report = maintain(out, args.retention_hours)
    except LeaseHeldError as exc:
        logging.getLogger("cxr").error("%s", exc)
        return 3
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
