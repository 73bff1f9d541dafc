"""The run page: one self-contained HTML file per score run (PRED_DIR/reports/R.html).

No server, no network, no script: pictures are inline data: URIs and a Content-Security-Policy forbids loading
anything else. Everything that comes from the data (paths, reasons, run ids, model names) goes through
html.escape. The page shows only what the run's tables and record already hold (README "Patient data").
"""
from __future__ import annotations

from html import escape
from typing import Any, Mapping, Sequence

from cxr.monitor import plots

SCOPE_REASONS = (("header_rules", "out of scope: DICOM header rules"),
                 ("not_frontal", "out of scope: not a frontal chest film (frontal check)"),
                 ("unlike_training", "out of scope: unlike the training films (distance)"))
COUNTS = ("input", "scored", "rejected", "out_of_scope", "skipped_unchanged", "skipped_already_scored")
PLOTS = (("calls", "Calls (scored images)"), ("confidence", "Confidence: top class probability"),
         ("status", "Status of the files looked at"), ("intensity", "Mean intensity of the preprocessed image"),
         ("size", "Longer side of the stored image (px)"), ("formats", "File formats"), ("ood", "Out of distribution"))
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}th{background:#f3f3f3}
.num{text-align:right}.drift{background:#fde0dc}.ok{color:#2e7d32}.bad{color:#c62828;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:8px}.thumb{width:180px;font-size:11px;word-break:break-all}
.thumb img{max-width:180px;display:block}.note{color:#555}"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], row_class: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _counts_section(record: Mapping[str, Any]) -> str:
    counts = record.get("counts") or {}
    cells = "".join(f'<tr><th>{_e(k.replace("_", " "))}</th><td class="num" id="count-{_e(k)}">{int(counts.get(k, 0))}'
                    f"</td></tr>" for k in COUNTS)
    away = record.get("scored_out_of_distribution")
    cells += (f'<tr><th>scored, out of distribution</th><td class="num" id="count-scored_out_of_distribution">'
              f"{_e(away)}</td></tr>")
    for key, what in SCOPE_REASONS:   # which check of the scope gate put files out (one file can count twice)
        cells += (f'<tr><th>{_e(what)}</th><td class="num" id="reason-{key}">'
                  f'{_e((record.get("scope_reasons") or {}).get(key, ""))}</td></tr>')
    src = record.get("sources") or {}
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="num">{int(v)}</td><td>{"never seen in training" if k in (src.get("unseen") or []) else ""}</td></tr>'
                   for k, v in (src.get("counts") or {}).items())
    notes = "".join(f'<p class="bad">{_e(w)}</p>' for w in src.get("warnings") or [])
    by_source = (f'<h3>Scored films per source</h3><table id="sources">{rows}</table>{notes}' if rows or notes else "")
    known = (record.get("model") or {}).get("card") or {}
    limits = "".join(f"<li>{_e(n)}</li>" for n in known.get("limits") or [])
    card = (f'<h3>What the model knows (its model card)</h3><p>Trained on: {_e(", ".join(known.get("sources") or []))}'
            f'</p><ul id="model-limits">{limits}</ul>' if known else "")
    return f"<h2>Counts</h2><table>{cells}</table>{by_source}{card}"


def _drift_section(monitoring: Mapping[str, Any], nights: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    drifted = monitoring.get("drifted") or []
    parts = ["<h2>Drift</h2>"]
    if drifted:
        parts.append('<p class="bad" id="drift-summary">Drift: ' + _e(", ".join(drifted)) + "</p>")
    else:
        parts.append('<p class="ok" id="drift-summary">No drift beyond the thresholds.</p>')
    parts += [f'<p class="note">{_e(n)}</p>' for n in monitoring.get("notes") or []]
    t = monitoring.get("thresholds") or {}
    parts.append(f'<p class="note">A statistic has drifted when PSI &ge; {_e(t.get("psi_threshold"))} and the '
                 f'chi-square test of homogeneity gives p &le; {_e(t.get("p_value"))} (conf monitor:).</p>')
    rows = monitoring.get("drift") or []
    parts.append(_table(("statistic", "baseline", "values (run)", "values (baseline)", "PSI", "chi-square p",
                         "PSI threshold", "drifted", "note"),
                        [(r["statistic"], r["baseline"], r["n_run"], r["n_baseline"], _fmt(r["value"], ".3f"),
                          _fmt(r["p_value"], ".2g"), r["threshold"], "yes" if r["drifted"] else "no", r["note"] or "")
                         for r in rows], ["drift" if r["drifted"] else "" for r in rows]))
    if nights:
        threshold = float(t.get("psi_threshold", 0.25))
        title = "PSI against the training reference, night over night"
        parts.append(f'<img alt="{_e(title)}" src="{plots.over_nights(nights, threshold, title)}">')
    return "".join(parts)


def _plots_section(monitoring: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> str:
    stats = monitoring.get("stats") or {}
    if not stats.get("rows"):
        return "<h2>Distributions</h2><p>This run looked at no new files.</p>"
    imgs = []
    for name, title in PLOTS:
        if name == "ood" and not stats["categorical"].get("ood"):
            continue
        imgs.append(f'<img alt="{_e(title)}" src="{plots.distribution(stats, baselines, name, title)}">')
    return "<h2>Distributions</h2><div class=\"grid\">" + "".join(imgs) + "</div>"


def _kept_out_section(kept_out: Sequence[Mapping[str, Any]], total: Mapping[str, int]) -> str:
    parts = ["<h2>Rejected and out-of-scope files</h2>"]
    if not kept_out:
        return parts[0] + "<p>None in this run.</p>"
    parts.append(_table(("status", "path", "stage", "reason"),
                        [(r["status"], r["path"], r["stage"], r["reason"]) for r in kept_out]))
    shown = len(kept_out)
    if sum(total.values()) > shown:
        parts.append(f'<p class="note">{shown} of {sum(total.values())} shown; all are in the errors and '
                     f"out_of_scope tables.</p>")
    return "".join(parts)


def _thumbs_section(title: str, items: Sequence[Mapping[str, Any]], anchor: str) -> str:
    if not items:
        return ""
    cells = []
    for it in items:
        img = f'<img alt="{_e(it["path"])}" src="{it["uri"]}">' if it.get("uri") else '<p class="note">(no image)</p>'
        cam = " (Grad-CAM)" if it.get("gradcam") else ""
        cells.append(f'<div class="thumb">{img}{_e(it["label"])} p={_fmt(it.get("p"), ".2f")}'
                     + (f" distance={_fmt(it.get('ood_distance'), '.2f')}" if it.get("ood_distance") is not None else "")
                     + f"{cam}<br>{_e(it['path'])}</div>")
    return f'<h2 id="{anchor}">{_e(title)}</h2><div class="grid">' + "".join(cells) + "</div>"


def render(record: Mapping[str, Any], monitoring: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]],
           kept_out: Sequence[Mapping[str, Any]], least_confident: Sequence[Mapping[str, Any]],
           most_ood: Sequence[Mapping[str, Any]], nights: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """baselines: {label: statistics} drawn beside the run's; kept_out: rows (status, path, stage, reason);
    least_confident / most_ood: {path, label, p, ood_distance, uri, gradcam}; nights: (run id, {statistic: PSI
    against the reference}) oldest first, this run last."""
    model = record.get("model") or {}
    facts = [("run", record.get("run_id")), ("started", record.get("started")), ("input", record.get("input")),
             ("mode", record.get("mode")), ("model", model.get("name")), ("model id", model.get("model_id")),
             ("registered", f"{model.get('registered_model')} v{model.get('registered_version')}"
              if model.get("registered_model") else None), ("seconds", record.get("seconds"))]
    head = _table(None, [(k, v) for k, v in facts if v is not None])
    status = (monitoring.get("stats") or {}).get("categorical", {}).get("status", {})
    body = [f"<h1>Score run {_e(record.get('run_id'))}</h1>", head, _counts_section(record),
            _drift_section(monitoring, nights), _plots_section(monitoring, baselines),
            _kept_out_section(kept_out, {k: v for k, v in status.items() if k != "scored"}),
            _thumbs_section("Least confident images", least_confident, "least-confident"),
            _thumbs_section("Most out-of-distribution images", most_ood, "most-ood")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><link rel="icon" href="data:,">'
            f"<title>cxr-spark score run {_e(record.get('run_id'))}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
