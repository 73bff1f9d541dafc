#!/usr/bin/env bash
# make demo: synthetic archive -> preprocess -> train + evaluate -> score, all in Spark local mode.
# The synthetic images only show that the pipeline works end to end; they say nothing about diagnosis.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
out="${DEMO_OUT:-out/demo}"
py=".venv/bin/python"
submit="scripts/submit.sh --master local[2]"

rm -rf "$out" && mkdir -p "$out"
echo "== 1/5 synthetic CXR-like archive (seed 0) -> $out/archive"
$py -m cxr.datasets.synth "$out/archive" --per-class 40 --size 256 --seed 0
echo "== 2/5 preprocess (decode, CLAHE, brightness, resize) -> $out/preprocessed"
$submit jobs/preprocess.py --conf demo --input "$out/archive" --output "$out/preprocessed" \
  --manifest "$out/archive/MANIFEST.csv"
echo "== 3/5 train on the driver, evaluate on the executors -> $out/models"
$submit jobs/train.py --conf demo --data "$out/preprocessed" --out "$out/models" \
  --register cxr --register-model cnn-adam --alias champion
echo "== 4/5 score the raw archive with models:/cxr@champion (cnn-adam), Grad-CAM overlays for 2 images per call"
$submit jobs/score.py --conf demo --input "$out/archive" --model "models:/cxr@champion" \
  --output "$out/predictions" --explain 2
echo "== 5/5 pictures: the study's Figure 1 and a sample sheet of the preprocessed images -> $out/figures"
mkdir -p "$out/figures"
$py -m cxr.explain.viz preprocess --from-parquet "$out/preprocessed" --n 3 --out "$out/figures/figure1.png" >/dev/null
$py -m cxr.explain.viz samples "$out/preprocessed" --per-class 4 --out "$out/figures/samples.png" >/dev/null

cat <<EOM

Demo finished (small models on synthetic images: conf/demo.yaml; on real X-rays train with --conf recommended on
both shared folders, and read the README's "Model quality and its limits" first: docs/sources.md). Results:
  preprocessed images   $out/preprocessed/images/      (Parquet; errors/, out_of_scope/, duplicates/ beside it)
  preprocess manifest   $out/preprocessed/manifest.json
  models                $out/models/<name>/            (model.keras or model.npz + model.json, model.onnx, metrics.json,
                        model_card.md: what the model was trained on and its limits)
  training report       $out/models/report.md          (the study's optimizer table, evaluation, plots)
  predictions           $out/predictions/predictions/  (a Delta table, partitioned by run_date and run_id; calls,
                        probabilities, ood_distance / in_distribution, DICOM identity; errors/ and out_of_scope/
                        beside it)
  score run record      $(ls "$out"/predictions/runs/*.json)
  run page              $(ls "$out"/predictions/reports/*.html)   (counts, drift, least confident images)
  Figure 1 panel        $out/figures/figure1.png     (each preprocessing step with its histogram)
  sample sheet          $out/figures/samples.png     (4 preprocessed images per class and split)
  MLflow runs + registry ${MLFLOW_TRACKING_URI:-sqlite:///$here/mlflow.db} (see them: .venv/bin/mlflow ui, then
                        http://127.0.0.1:5000; the demo registered cnn-adam as models:/cxr@champion)
  Grad-CAM overlays     $out/predictions/explain/    (index: $out/predictions/explanations/), e.g.
$(ls "$out"/predictions/explain/run_id=*/*.png | head -3 | sed 's/^/                        /')
EOM
