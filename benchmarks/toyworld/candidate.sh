#!/usr/bin/env bash
# Judge a freshly trained toy-sd before it replaces the shipped one, in the order that fails fastest:
#
#     bash benchmarks/toyworld/candidate.sh MODEL_DIR [OUT_DIR]
#
# 1. text prompts: the model card's scores (200 unseen 1–2-object captions, 100 of 3–4 objects, guidance 5)
#    -> OUT/scores.json, and the training curve -> OUT/training.png;
# 2. every toy behaviour test with SCENETOK_TOY_SD=MODEL_DIR (the method tests that decide whether the model can
#    be shipped; v1e failed two of them) -> OUT/tests.log;
# 3. `scenetok demo` on it -> OUT/demo/ (report, wall time in OUT/demo.log);
# 4. Break-A-Scene on the tuning scenes (never the suite) -> OUT/tuning/.
#
# STAGES="1 2 3 4" picks the stages. Each stage logs its wall time; nothing of the shipped model is touched.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?usage: candidate.sh MODEL_DIR [OUT_DIR]}
MODEL=$(cd "$MODEL" && pwd)
OUT=${2:-candidate-$(basename "$MODEL")}
STAGES=${STAGES:-"1 2 3 4"}
[ -f "$MODEL/model_index.json" ] || { echo "candidate.sh: $MODEL is not a diffusers pipeline folder (no model_index.json)" >&2; exit 2; }
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False SCENETOK_TOY_SD="$MODEL"
stage() { echo "[candidate $(date +%H:%M:%S)] $*"; }
for s in $STAGES; do
    t0=$(date +%s)
    case $s in
        1) stage "1: text-prompt scores"
           python benchmarks/toyworld/toy_sd_scores.py "$MODEL" --guidance 5 --out "$OUT/scores.json" \
               --plot "$OUT/training.png" > "$OUT/scores.log" 2>&1; tail -n 12 "$OUT/scores.log" ;;
        2) stage "2: toy behaviour tests"
           python -m pytest -q -p no:cacheprovider tests/test_toysd.py tests/test_break_a_scene_toy.py \
               tests/test_em_masks.py tests/test_disendiff.py tests/test_textual_localization.py \
               tests/test_baselines.py tests/test_toy_settings.py tests/test_applications_toy.py tests/test_demo.py \
               > "$OUT/tests.log" 2>&1; tail -n 15 "$OUT/tests.log" ;;
        3) stage "3: demo"
           rm -rf "$OUT/demo"
           { time scenetok demo -o "$OUT/demo" --quiet ; } > "$OUT/demo.log" 2>&1 || true
           tail -n 6 "$OUT/demo.log" ;;
        4) stage "4: Break-A-Scene on the tuning scenes"
           scenetok benchmark toyworld -o "$OUT/tuning" --scene-set tuning-all --seeds 4 \
               --methods break-a-scene:base --no-ablations > "$OUT/tuning.log" 2>&1; tail -n 8 "$OUT/tuning.log" ;;
        *) echo "candidate.sh: unknown stage $s (1-4)" >&2; exit 2 ;;
    esac
    stage "stage $s took $(( $(date +%s) - t0 )) s"
done
