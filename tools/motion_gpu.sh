#!/usr/bin/env bash
# Issue 10's motion question for a lent GPU machine, in one call (tools/motion_run.py; docs/WORLD.md): does the
# world DiT learn the motion word with far more samples, and with subjects that move farther?
#
#   tools/motion_gpu.sh                        # on the GPU machine: ~8 minutes (END seconds) on one H200
#   DEVICE=cpu SAMPLES=6 HELD=4 BATCH=2 END=60 tools/motion_gpu.sh   # the same glue, tiny, on the CPU
#
# 1. three world caches side by side, travel 0.3 (the shipped defaults' world) and 0.5 (MAX_TRAVEL), and 0.5 with
#    one subject in every scene (0.5s), SAMPLES training and HELD held-out triplets each, the VAE on DEVICE, no new
#    chunk after CACHE_DEADLINE seconds;
# 2. four trainings side by side until END seconds after the start, at batch BATCH (default 32): the MMDiT with its
#    pooled vectors in the three worlds and the Phantom-Wan DiT in the faster one, each probed every 500 steps
#    (training and held-out triplets);
# 3. into OUT (default output/motion_gpu): each run's half-size weights and one results.tgz of logs and curves.
# The world's emoji subjects need Debian's Noto colour emoji font: a machine without it gets the file carried and
# PHANTOM_EMOJI_FONT pointing at it. Exit status 1 if a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; DEVICE=${DEVICE:-cuda}; SAMPLES=${SAMPLES:-1500}; HELD=${HELD:-48}; BATCH=${BATCH:-32}
CACHE_DEADLINE=${CACHE_DEADLINE:-150}; END=${END:-470}; OUT=${OUT:-output/motion_gpu}; WORK=${WORK:-/tmp/motion_gpu}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
start=$(date +%s); failed=0
for world in 0.3 0.5 0.5s; do  # a trailing "s": one subject in every training scene
    subjects=(); [[ $world == *s ]] && subjects=(--subjects 1)
    timeout $((CACHE_DEADLINE + 120)) $PY -m tools.motion_run cache --work "$WORK/w$world" --travel "${world%s}" \
        --samples "$SAMPLES" "${subjects[@]}" --held-out "$HELD" --workers 5 --deadline "$CACHE_DEADLINE" \
        --device "$DEVICE" > "$WORK/cache$world.log" 2>&1 &
done
wait
grep -h "cached\|deadline\|Error" "$WORK"/cache*.log
left=$((END - ($(date +%s) - start) - 30)); ((left < 20)) && left=20
echo "caches done after $(($(date +%s) - start)) s; training for $left s"
run() {  # name, world, then motion_run train options
    local name=$1 world=$2; shift 2
    timeout $((left + 120)) $PY -m tools.motion_run train --work "$WORK/w$world" --seconds "$left" --device "$DEVICE" \
        --every 500 --out "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 || echo "$name failed" >> "$WORK/failed"
}
run a03_pooled_b32 0.3 --network mmdit-pooled --batch "$BATCH" &
run b05_pooled_b32 0.5 --network mmdit-pooled --batch "$BATCH" &
run c05_wan_b32 0.5 --network phantom-wan --batch "$BATCH" &
run d05s_pooled_b32 0.5s --network mmdit-pooled --batch "$BATCH" &
wait
for log in "$WORK"/[a-d]0*.log; do echo "== $log"; grep -v "loss" "$log" | tail -n 12; done
[[ -f $WORK/failed ]] && { cat "$WORK/failed"; failed=1; }
cp "$WORK"/*_fp16.safetensors "$OUT"/ 2>/dev/null
(cd "$WORK" && tar czf - ./*.log ./*_curve.json 2>/dev/null) > "$OUT/results.tgz"
echo "done after $(($(date +%s) - start)) s: $OUT"
exit $failed
