#!/usr/bin/env bash
# Train a larger shipped candidate (configs/gpu_forward.toml, 14.7M parameters) and its reverse
# model (configs/gpu_reverse.toml, 5.4M) from scratch, side by side on one lent GPU, in ONE call
# of the device tool (a session has 15 minutes of device time, a call at most 10). Untried on a
# GPU as written (2026-12-03: no session since the sixth was lent one); run locally, it trains on
# the CPU, which is how it was checked (tiny: EXTRA="--max-steps 3 --eval-every 3").
#
#   here, once:   echo /.whl/ >> .git/info/exclude
#                 pip download --no-deps --only-binary=:all: -d .whl chitchat-dataset==0.9.0
#   device tool:  run(command="bash scripts/gpu_round.sh", carry=[".whl"], timeout_s=600)
#   here, after:  cat FILES_AT/ship.tgz.part-* | tar xzf - -C runs/   # runs/ship: forward + reverse/
#                 then judge it as docs/QUALITY.md says before shipping it
#
# The device image has torch, tokenizers, safetensors, tqdm, matplotlib, sacrebleu and pyyaml;
# only the corpus package travels, as a wheel. Each run is stopped by SIGTERM after TRAIN_S
# seconds if its max_steps take longer: the trainer then saves its state and keeps the best
# checkpoint by validation loss (the cosine schedule is then cut short; the log's tokens_per_s
# says what max_steps would fit next time, and `--resume` continues either run).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_round_out}
W=${GPU_ROUND_DIR:-/tmp/gpu_round}
PY=${PY:-python3}
TRAIN_S=${TRAIN_S:-450}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$W"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_round_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_round_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ date -u; nproc; nvidia-smi -L 2>&1; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
    > "$OUT/machine.txt" 2>&1

train() {  # $1: config name; its checkpoint goes to $W/$1
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    timeout -s TERM -k 60 "$TRAIN_S" "$PY" -m app.cli train --corpus chitchat \
        --config "configs/$1.toml" --out "$W/$1" --no-progress $EXTRA
}
train gpu_forward > "$OUT/forward.log" 2>&1 & forward=$!
train gpu_reverse > "$OUT/reverse.log" 2>&1 & reverse=$!
wait $forward; echo "forward run: exit $?" >> "$OUT/machine.txt"
wait $reverse; echo "reverse run: exit $?" >> "$OUT/machine.txt"

"$PY" -m app.cli eval --checkpoint "$W/gpu_forward" --corpus chitchat --split test \
    --setting-pairs 0 --max-generate 0 --no-samples > "$OUT/forward_test.json" 2>> "$OUT/forward.log"
# Packaged as the shipped model is: float16, the reverse model in reverse/, with the runs' logs.
"$PY" - "$W" <<'EOF' >> "$OUT/machine.txt" 2>&1
import shutil, sys
from pathlib import Path
from model.runs import export_half
w = Path(sys.argv[1])
export_half(w / "gpu_forward", w / "ship")
export_half(w / "gpu_reverse", w / "ship" / "reverse")
for run, dst in (("gpu_forward", w / "ship"), ("gpu_reverse", w / "ship" / "reverse")):
    shutil.copy(w / run / "log.jsonl", dst / "train_log.jsonl")
print("packaged", sorted(str(p.relative_to(w)) for p in (w / "ship").rglob("*")))
EOF
# Files come back at most 16 MiB each and 8 in all: one archive in 15 MiB parts.
tar czf - -C "$W" ship | split -b 15M - "$OUT/ship.tgz.part-"
ls -la "$OUT"
