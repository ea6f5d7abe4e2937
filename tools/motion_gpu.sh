#!/usr/bin/env bash
# Issue 10's motion question for a lent GPU machine, in one call (tools/motion_run.py; docs/WORLD.md): does the
# world DiT learn the motion word with far more samples, and with subjects that move farther?
#
#   tools/motion_gpu.sh                        # on the GPU machine: ~8 minutes (END seconds) on one H200
#   DEVICE=cpu SAMPLES=6 HELD=4 END=60 tools/motion_gpu.sh   # the same glue, tiny, on the CPU
#
# 1. two world caches side by side, travel 0.3 (the shipped defaults' world) and 0.5 (MAX_TRAVEL), SAMPLES training
#    and HELD held-out triplets each, the VAE on DEVICE, no new chunk after CACHE_DEADLINE seconds;
# 2. four trainings side by side until END seconds after the start: the MMDiT with its pooled vectors at batch 32 in
#    both worlds, the Phantom-Wan DiT at batch 32 and the MMDiT at batch 8 in the faster one, each probed every 500
#    steps (training and held-out triplets);
# 3. into OUT (default output/motion_gpu): each run's half-size weights and one results.tgz of logs and curves.
# The world's emoji subjects need Debian's Noto colour emoji font: a machine without it gets the file carried and
# PHANTOM_EMOJI_FONT pointing at it. Exit status 1 if a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; DEVICE=${DEVICE:-cuda}; SAMPLES=${SAMPLES:-1500}; HELD=${HELD:-48}
CACHE_DEADLINE=${CACHE_DEADLINE:-150}; END=${END:-470}; OUT=${OUT:-output/motion_gpu}; WORK=${WORK:-/tmp/motion_gpu}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
start=$(date +%s); failed=0
for travel in 0.3 0.5; do
    timeout $((CACHE_DEADLINE + 120)) $PY -m tools.motion_run cache --work "$WORK/w$travel" --travel $travel \
        --samples "$SAMPLES" --held-out "$HELD" --workers 7 --deadline "$CACHE_DEADLINE" --device "$DEVICE" \
        > "$WORK/cache$travel.log" 2>&1 &
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
run a03_pooled_b32 0.3 --network mmdit-pooled --batch 32 &
run b05_pooled_b32 0.5 --network mmdit-pooled --batch 32 &
run c05_wan_b32 0.5 --network phantom-wan --batch 32 &
run d05_pooled_b8 0.5 --network mmdit-pooled --batch 8 &
wait
for log in "$WORK"/[a-d]0*.log; do echo "== $log"; grep -v "loss" "$log" | tail -n 12; done
[[ -f $WORK/failed ]] && { cat "$WORK/failed"; failed=1; }
cp "$WORK"/*_fp16.safetensors "$OUT"/ 2>/dev/null
(cd "$WORK" && tar czf - ./*.log ./*_curve.json 2>/dev/null) > "$OUT/results.tgz"
echo "done after $(($(date +%s) - start)) s: $OUT"
exit $failed
