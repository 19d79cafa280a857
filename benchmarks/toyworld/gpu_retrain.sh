#!/usr/bin/env bash
# Retrain toy-sd on a lent GPU (the `device` tool's nvidia-h200) in one call, and bring the weights back.
#
# The GPU machine has PyTorch, transformers, peft and accelerate but no diffusers, and nothing can be fetched
# there, so prepare the wheels here first (pure-Python wheels, for its Python 3.12):
#
#     bash benchmarks/toyworld/gpu_retrain.sh --fetch-wheels          # -> .whl/ (ignored by git)
#
# then call the device tool once:
#
#     run(command="bash benchmarks/toyworld/gpu_retrain.sh", carry=[".whl"], timeout_s=590)
#
# It trains the one-command recipe (`scenetok toyworld train` defaults: 40 000 scenes, VAE 1 500 steps,
# 11 000 UNet steps with min-SNR-γ 5, bf16 on the GPU) once per value of $VARIANTS (default "0 0.3": the
# --bare-nouns probability; the runs share the GPU side by side), each with its UNet stage capped at
# $MINUTES minutes as a safety net (default 5, so that rendering, the VAE, the UNet and scoring fit the
# device tool's 10-minute command; a GPU too slow for 11 000 steps in that time re-plans the step count from the
# measured speed, and the model is then not the recipe's). Each run is scored by the oracle and its bare-noun
# localization measured (benchmarks/toyworld/noun_localization.py). In $OUT, per variant V:
# train-bnV.log, info-bnV.json and the model as toy-sd-bnV.tar.part-aa, -ab (the device tool returns at
# most 8 files of ≤ 16 MiB: two variants fit). Unpack here:  cat toy-sd-bnV.tar.part-* | tar -x -C DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata
    ls -la .whl
    exit 0
fi
OUT=${OUT:-gpu-retrain-out}
MINUTES=${MINUTES:-5}
UNET_STEPS=${UNET_STEPS:-11000}
SEED=${SEED:-0}
VARIANTS=${VARIANTS:-"0 0.3"}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="--n-images 200 --vae-steps 5" MINUTES=0.2: a smoke test of this script
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
versions=$(python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)")
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi")
work=/tmp/gpu-retrain
rm -rf "$work" && mkdir -p "$work"
pids=()
for v in $VARIANTS; do
    log="$OUT/train-bn$v.log"
    echo "$versions; $gpu; --bare-nouns $v" > "$log"
    ( python3 -m scenetok.toyworld.train --out "$work/bn$v/toy-sd" --device "$DEVICE" --seed "$SEED" --threads 4 \
          --minutes "$MINUTES" --unet-steps "$UNET_STEPS" --eval-every-minutes 2 --no-progress --log-every 500 \
          --bare-nouns "$v" ${EXTRA:-} \
      && python3 benchmarks/toyworld/noun_localization.py "$work/bn$v/toy-sd" --json "$work/bn$v/localization.json" \
    ) >> "$log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for v in $VARIANTS; do
    if [ -f "$work/bn$v/toy-sd/training_info.json" ]; then
        python3 - "$work/bn$v" "$OUT/info-bn$v.json" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
info = json.loads((d / "toy-sd" / "training_info.json").read_text())
loc = d / "localization.json"
info["noun_localization"] = json.loads(loc.read_text()) if loc.exists() else None
pathlib.Path(sys.argv[2]).write_text(json.dumps(info, indent=1))
PY
        (cd "$work/bn$v" && tar -cf - toy-sd) | split -b 15m - "$OUT/toy-sd-bn$v.tar.part-"
    fi
done
ls -la "$OUT"
exit $status
