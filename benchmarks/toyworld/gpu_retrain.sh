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
# 11 000 UNet steps with min-SNR-γ 5, bf16 on the GPU) with the UNet stage capped at $MINUTES minutes as a
# safety net (default 7; if the GPU is slower than that, the step count is re-planned from the measured
# speed and the model is not the recipe's), scores it with the oracle, and leaves in $OUT:
# train.log, training_info.json and the model as toy-sd.tar.part-aa, -ab … (the device tool returns files
# of at most 16 MiB). Unpack here:  cat toy-sd.tar.part-* | tar -x -C DIR   (DIR/toy-sd is the model).
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
MINUTES=${MINUTES:-7}
UNET_STEPS=${UNET_STEPS:-11000}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="--n-images 200 --vae-steps 5" MINUTES=0.2: a smoke test of this script
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee "$OUT/train.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/train.log" || true
work=/tmp/gpu-retrain
rm -rf "$work" && mkdir -p "$work"
python3 -m scenetok.toyworld.train --out "$work/toy-sd" --device "$DEVICE" --seed "$SEED" --threads 8 \
    --minutes "$MINUTES" --unet-steps "$UNET_STEPS" --eval-every-minutes 2 --no-progress --log-every 500 ${EXTRA:-} \
    2>&1 | tee -a "$OUT/train.log"
cp "$work/toy-sd/training_info.json" "$OUT/"
(cd "$work" && tar -cf - toy-sd) | split -b 15m - "$OUT/toy-sd.tar.part-"
ls -la "$OUT"
