#!/usr/bin/env bash
# Distill the one-step student shipped as `demo-1step` (src/meissonic/assets/demo-1step) from the shipped demo model,
# with the project's own commands: prompts (data shapes) -> distill -> judge (eval shapes) -> fp16 student folder.
#
#   scripts/make_demo_student.sh [WORK_DIR]      (default ./demo-student-build)
#
# Measured on 2 CPU cores: see the README ("One step: Di[M]O students"). Each stage is skipped when its output exists,
# and the distillation resumes from its last checkpoint when it was interrupted, so running the script again continues
# where it stopped. Nothing shipped is touched: the result is WORK_DIR/demo-1step; copy it over
# src/meissonic/assets/demo-1step to ship it.
set -euo pipefail
W=${1:-demo-student-build}
M=${MEISSONIC:-meissonic}
PY=${PYTHON:-python3}
mkdir -p "$W"

resume() { [ -n "$(ls -A "$1/checkpoints" 2>/dev/null)" ] && echo "--resume latest" || true; }

# 1. Prompts: the captions of 16,000 training scenes (seen pairs only; the images are drawn small and never read).
[ -f "$W/prompts.parquet" ] || $M data shapes --num 16000 --seed 11 --size 64 --out "$W/prompts.parquet"

# 2. Distillation from the demo (12 steps, guidance 1.5): the student and the auxiliary model start as copies of the
#    demo's transformer; forward KL; the student's input is random ids with half of them masked.
[ -f "$W/student/model_index.json" ] || $M distill --teacher demo --data "$W/prompts.parquet" --out "$W/student" \
  --batch-size ${BATCH:-16} --max-steps ${STEPS:-1500} --learning-rate ${LR:-1e-4} --aux-learning-rate ${AUX_LR:-1e-4} \
  --guidance-scale ${GUIDANCE:-1.5} --mask-ratio 0.5 --embedding-noise 0.3 --sample-embedding-noise 0.1 \
  --ema-decay 0.99 --mixed-precision bf16 --checkpoint-every 250 --log-every 10 \
  --validation-every 250 --validation-prompt "a large red circle on the left" \
  --validation-prompt "a small blue square to the left of a yellow star" $(resume "$W/student")

# 3. Judge it (the README's figures).
$M eval shapes --model "$W/student" --num 100 --seed 0

# 4. The shipped form: the fp16 transformer and student.json (its teacher is the demo; see meissonic.loading).
[ -d "$W/student-fp16" ] || $M convert --model "$W/student" --out "$W/student-fp16" --dtype fp16
if [ ! -f "$W/demo-1step/student.json" ]; then
  mkdir -p "$W/demo-1step"
  cp -r "$W/student-fp16/transformer" "$W/demo-1step/"
  $PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
saved = json.loads((work / "student-fp16" / "model_index.json").read_text())["_meissonic_defaults"]
(work / "demo-1step" / "student.json").write_text(json.dumps({"base_model": "demo", "one_step": saved["one_step"]},
                                                             indent=2) + "\n")
EOF
fi
echo "done: $W/demo-1step"
