"""A batch of files (path, content) -> a batch of preprocessed rows, each either an image or a rejection.

Pandas in, pandas out, so that Spark's mapInPandas can call it on Arrow batches and tests can call it
without Spark. A file never escapes as an exception: whatever goes wrong becomes a row with a reason.
"""
from __future__ import annotations

import hashlib
import time
from typing import Mapping

import pandas as pd

from cxr.image.deadline import TimeLimitExceeded, time_limit
from cxr.image.frame import framed_sides
from cxr.image.pipeline import PreprocessParams, preprocess_bytes
from cxr.image.rejection import RejectedImage
from cxr.common.labels import infer_label
from cxr.scope.dicom_header import DICOM_COLUMNS
from cxr.scope.rules import STAGE as SCOPE_STAGE

COLUMNS = ("path", "rel_path", "label", "sha256", "status", "stage", "reason", "image", "height", "width",
           "orig_height", "orig_width", "orig_dtype", "source_format", "color_mode", "decode_warnings",
           *DICOM_COLUMNS)
OUT_OF_SCOPE = "out_of_scope"   # status of a file the scope gate keeps from the model (not an error)


def relative_to(path: str, root: str | tuple[str, ...]) -> str:
    """path below root (the longest of several roots that holds it); the file name when none does."""
    for r in sorted((root,) if isinstance(root, str) else root, key=len, reverse=True):
        prefix = r.rstrip("/") + "/"
        if path.startswith(prefix):
            return path[len(prefix):]
    return path.rsplit("/", 1)[-1]


def process_file(path: str, content: bytes | None, root: str | tuple[str, ...], params: PreprocessParams,
                 aliases: Mapping[str, str], gate=None, sha256: str | None = None, frame: bool = False) -> dict:
    """gate (cxr.scope.rules.ScopeGate): read a DICOM's header into the row and keep an out-of-scope file
    (lateral, CT, no pixels, ...) from being decoded: status out_of_scope, stage "scope", the reason.
    sha256: the content's digest when the caller already computed it (not hashed twice). frame: also count the
    sides of the decoded film a uniform frame runs along (`framed_sides`, not a column: the score job's frame
    check, cxr.image.frame)."""
    rel = relative_to(path, root)
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, rel_path=rel, label=infer_label(rel, aliases), status="error")
    try:
        data = bytes(content) if content is not None else b""
        row["sha256"] = sha256 or hashlib.sha256(data).hexdigest()
        if gate is not None:
            columns, out_of_scope = gate.check(data)
            row.update(columns)
            if out_of_scope:
                row.update(status=OUT_OF_SCOPE, stage=SCOPE_STAGE, reason=out_of_scope)
                return row
        started = time.perf_counter()
        with time_limit(params.time_limit_s):
            decoded, image = preprocess_bytes(data, params)
    except TimeLimitExceeded:
        row.update(stage="decode", reason=f"took more than {params.time_limit_s:g} s to decode and prepare "
                                          f"(stopped after {time.perf_counter() - started:.1f} s; "
                                          f"preprocess.time_limit_s): a damaged or hostile file")
        return row
    except RejectedImage as exc:
        row.update(stage=exc.stage, reason=exc.reason)
        return row
    except MemoryError:
        row.update(stage="decode", reason="ran out of memory while decoding this image")
        return row
    except Exception as exc:  # a file must never crash the job: report what happened instead
        row.update(stage="internal", reason=f"unexpected {type(exc).__name__} while preprocessing: {exc}")
        return row
    row.update(status="ok", image=image.tobytes(), height=int(image.shape[0]), width=int(image.shape[1]),
               orig_height=decoded.orig_height, orig_width=decoded.orig_width, orig_dtype=decoded.orig_dtype,
               source_format=decoded.source_format, color_mode=decoded.color_mode,
               decode_warnings="; ".join(decoded.warnings) or None)
    if frame:
        row["framed_sides"] = framed_sides(decoded.pixels)
    return row


def process_frame(frame: pd.DataFrame, root: str, params: PreprocessParams, aliases: Mapping[str, str],
                  gate=None) -> pd.DataFrame:
    rows = [process_file(p, c, root, params, aliases, gate) for p, c in zip(frame["path"], frame["content"])]
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("height", "width", "orig_height", "orig_width"):
        out[col] = out[col].astype("Int32")
    return out
