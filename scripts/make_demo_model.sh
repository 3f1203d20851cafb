#!/usr/bin/env bash
# Train the demo model shipped in src/meissonic/assets/demo-model from nothing, with the project's own commands:
# data -> tokenizer (train-vq) -> transformer + text encoder (train) -> judge (eval shapes) -> fp16 copy.
#
#   scripts/make_demo_model.sh [WORK_DIR]      (default ./demo-build)
#
# Measured on 2 CPU cores: data 2 x 2.4 min, tokenizer 31.5 min, pre-encoding 2.5 min, transformer 4,000 steps at
# 1.5-1.6 steps/s (41-44 min when it has the CPU to itself): about 80 minutes.
#
# Each stage is skipped when its output exists and resumes from its last checkpoint when it was interrupted, so
# running the script again continues where it stopped. Nothing shipped is touched: the result is
# WORK_DIR/demo-model-fp16; copy it over src/meissonic/assets/demo-model to ship it.
set -euo pipefail
W=${1:-demo-build}
M=${MEISSONIC:-meissonic}
mkdir -p "$W"

resume() { [ -n "$(ls -A "$1/checkpoints" 2>/dev/null)" ] && echo "--resume latest" || true; }

# 1. Data: 16,000 captioned 256x256 scenes (the transformer sees each about eight times). Held-out colour-shape pairs
#    never appear. The tokenizer learns from them with each object shifted up to 4% of the side off its named place
#    (so it codes any placement, as edits need); the transformer from the same scenes drawn exactly at their places,
#    so that "on the left" is one token pattern to learn, not many (30/4/6% fully right -> 50/32/24% at guidance 3).
[ -f "$W/data.parquet" ] || $M data shapes --num 16000 --seed 1 --out "$W/data.parquet"
[ -f "$W/data-exact.parquet" ] || $M data shapes --num 16000 --seed 1 --jitter 0 --out "$W/data-exact.parquet"

# 2. Tokenizer: f=8, 512 codes, trained on 64-pixel crops of the images at 128 pixels (the demo's size: 16x16 tokens);
#    EMA codebook with dead-code re-seeding; whitened-colour and hard-pixel terms so that small coloured objects keep
#    their hue. Its learning rate is constant, so 3,000 steps = 2,000 steps resumed for 1,000 more.
[ -d "$W/vq/vqvae" ] || $M train-vq --data "$W/data.parquet" --out "$W/vq" --preset demo \
  --resolution 128 --crop-size 64 --batch-size 32 --learning-rate 1e-3 --mixed-precision bf16 \
  --codebook-ema 0.99 --reset-dead-every 25 --hard-pixel-weight 1.0 --whitened-weight 0.05 \
  --max-steps 3000 --checkpoint-every 250 --log-every 25 $(resume "$W/vq")

# 3. Transformer and text encoder, trained together from scratch (the text encoder reads the real CLIP tokenizer's
#    ids), from a cache of the images' tokens. The text encoder learns 10x slower than the transformer: at the same
#    rate it collapses into a constant (every prompt encoded alike) that the transformer uses as a bias. The saved
#    model is the EMA of the weights (decay 0.999).
[ -f "$W/model/model_index.json" ] || $M train --data "$W/data-exact.parquet" --out "$W/model" --preset demo \
  --vqvae "$W/vq/vqvae" --train-text-encoder --cache "$W/cache" --resolution 128 \
  --batch-size 32 --max-steps ${STEPS:-4000} --learning-rate 1.5e-3 --text-encoder-lr 1.5e-4 --lr-scheduler cosine \
  --warmup-steps 200 --weight-decay 0.01 --ema-decay 0.999 --mixed-precision bf16 --cond-dropout 0.1 --mask-rate-power 1 \
  --checkpoint-every 500 --log-every 25 $(resume "$W/model")

# 4. Judge it (the README's figures), then write the fp16 copy that ships.
$M eval shapes --model "$W/model" --num 50 --seed 0
[ -d "$W/demo-model-fp16" ] || $M convert --model "$W/model" --out "$W/demo-model-fp16" --dtype fp16
