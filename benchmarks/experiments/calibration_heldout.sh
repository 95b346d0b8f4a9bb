#!/usr/bin/env bash
# Calibrated thresholds vs one global tau, on tasks the calibration never saw (issue 19, item 2).
#
# For one model and its lengths, per length:
#   1. calibrate on CALIBRATION tasks {niah_single_1, niah_multikey_1, passkey} in calibration's own seed space
#      (`--seed 1`: task seeds 1001+, the evaluation uses 42), at the density that one global tau = 0.9 / 0.95 has on
#      those prompts (`--target density=tau:T`), for both statistics (`mass`: over every query row; `answer_mass`:
#      over the last block of query rows) and both granularities (`--per head` / `--per layer`): 8 thresholds files.
#      Only one model run per statistic: the other targets and --per layer are re-chosen from its stored tables
#      (`xattention calibrate --from FILE`), which needs no model.
#   2. `xattention eval` on the HELD-OUT tasks (every other task: niah_single_2/3, niah_multikey_2/3, niah_multivalue,
#      niah_multiquery, vt, cwe, fwe) for dense, global tau in {0.85, 0.9, 0.95} and each thresholds file
#      (`xattention:stride=8,thresholds=FILE`), all into one out folder (eval appends and skips finished results).
# Then `xattention eval report OUT` (summary.md / summary.json / score_vs_density.png): compare calibrated and global
# tau on the score-vs-density curve.
#
# Time: the whole invocation stays inside --budget seconds (default 540, for a 10-minute call): every step gets a hard
# `timeout` at the deadline, no calibration starts with less than --cal-reserve seconds left, and eval gets
# `--time-budget` = what is left minus --margin (it starts no new batch after that). When the budget runs out the
# script exits 3: run the SAME command again and it resumes (finished thresholds files and eval results are kept).
# Exit 0: everything done and the report written. Exit 2: bad arguments. Other: a step failed.
#
# Run from anywhere; commands run in the repository root as `PYTHONPATH=src python3 -m xattention ...` (no install).
# gemma3-270m needs transformers >= 5.24 (older versions break its tokenizer; load_model refuses them, exit 1).
#
# On one H200 (device calls of at most 10 minutes; repeat each line until it exits 0):
#   benchmarks/experiments/calibration_heldout.sh --model smollm2 --lengths 4k
#   benchmarks/experiments/calibration_heldout.sh --model smollm2 --lengths 8k
#   benchmarks/experiments/calibration_heldout.sh --model gemma3-270m --lengths 8k
#   benchmarks/experiments/calibration_heldout.sh --model gemma3-270m --lengths 16k
# (one length per call keeps each call's work small; all lengths of a model share its --out folder and report).
# CPU dry run (proves the commands parse and the pipeline ends in a report; minutes):
#   benchmarks/experiments/calibration_heldout.sh --model smollm2 --lengths 512 --samples 1 --cal-samples 3 \
#       --heldout niah_single_2,vt --device cpu --dtype float32 --batch-size 4 --budget 3000 --out /tmp/heldout-dry
#
# Options (defaults in brackets):
#   --model NAME        smollm2 | gemma3-270m (anything xattention.models loads, with --lengths and --batch-size)
#   --lengths LIST      comma list, k = 1024 [smollm2: 4k,8k; gemma3-270m: 8k,16k]
#   --samples N         eval samples per (task, length, method) [16]
#   --cal-samples N     calibration prompts per length, rotating over the calibration tasks [6: two per task]
#   --taus "T ..."      global taus whose density the calibrated files match [0.9 0.95]
#   --globals LIST      global taus evaluated [0.85,0.9,0.95]
#   --heldout LIST      evaluation tasks [every task but the calibration ones]
#   --batch-size N      eval prompts per generate call [smollm2: 192; gemma3-270m: 96 at <= 8K, 48 above]
#   --dtype D           model dtype for calibration and eval [bfloat16]
#   --device D          torch device for both [the loader's choice: cuda when there is one]
#   --out DIR           a relative path is taken from the repository root [benchmarks/results/calibration-heldout-MODEL]
#   --budget S          seconds for this invocation [540]
#   --margin S          seconds kept back from eval's --time-budget for its model load, last batch and summary [90]
#   --cal-reserve S     least seconds left to start a calibration [60]
#   --no-mass           do not record the attention mass kept in eval (faster; the report then has density only)
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "calibration_heldout.sh: error: $*" >&2; exit 2; }

MODEL=smollm2 LENGTHS="" SAMPLES=16 CAL_SAMPLES=6 TAUS="0.9 0.95" GLOBALS="0.85,0.9,0.95" HELDOUT="" BATCH=""
DTYPE=bfloat16 DEVICE="" OUT="" BUDGET=540 MARGIN=90 CAL_RESERVE=60 MASS=--mass
CAL_TASKS=niah_single_1,niah_multikey_1,passkey
ALL_TASKS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe,passkey
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --no-mass) MASS=""; shift; continue ;;
        --model|--lengths|--samples|--cal-samples|--taus|--globals|--heldout|--batch-size|--dtype|--device|--out|--budget|--margin|--cal-reserve)
            [ $# -ge 2 ] || die "$1 needs a value" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    case "$1" in
        --model) MODEL=$2 ;; --lengths) LENGTHS=$2 ;; --samples) SAMPLES=$2 ;; --cal-samples) CAL_SAMPLES=$2 ;;
        --taus) TAUS=$2 ;; --globals) GLOBALS=$2 ;; --heldout) HELDOUT=$2 ;; --batch-size) BATCH=$2 ;;
        --dtype) DTYPE=$2 ;; --device) DEVICE=$2 ;; --out) OUT=$2 ;; --budget) BUDGET=$2 ;; --margin) MARGIN=$2 ;;
        --cal-reserve) CAL_RESERVE=$2 ;;
    esac
    shift 2
done
for v in SAMPLES CAL_SAMPLES BUDGET MARGIN CAL_RESERVE ${BATCH:+BATCH}; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a whole number, got '${!v}'"
done
case "$MODEL" in
    smollm2) LENGTHS=${LENGTHS:-4k,8k} ;;
    gemma3-270m) LENGTHS=${LENGTHS:-8k,16k} ;;
    *) [ -n "$LENGTHS" ] || die "--lengths is needed for model $MODEL" ;;
esac
if [ -z "$HELDOUT" ]; then  # every task but the calibration ones
    HELDOUT=$(tr ',' '\n' <<<"$ALL_TASKS" | grep -vxF -f <(tr ',' '\n' <<<"$CAL_TASKS") | paste -sd, -)
fi
for t in ${HELDOUT//,/ }; do
    [[ ",$CAL_TASKS," == *",$t,"* ]] && die "held-out task $t is a calibration task"
done
SAFE_MODEL=$(tr -c 'A-Za-z0-9._\n-' '_' <<<"$MODEL")
OUT=${OUT:-benchmarks/results/calibration-heldout-$SAFE_MODEL}

cd "$(dirname "$0")/../.." || exit 1  # the repository root: src/ and relative --out paths
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
XA=("${PYTHON:-python3}" -m xattention)
COMMON=(--model "$MODEL" --dtype "$DTYPE" ${DEVICE:+--device "$DEVICE"})
DEADLINE=$((SECONDS + BUDGET))
left() { echo $((DEADLINE - SECONDS)); }
stop() { echo "calibration_heldout.sh: $* -- rerun the same command to resume" >&2; exit 3; }
# run a step under a hard deadline (SIGINT first: eval saves what it finished and exits 130)
timed() {
    local t; t=$(left)
    [ "$t" -gt 0 ] || stop "no time left"  # (timeout 0 would mean no limit at all)
    timeout -s INT -k 15 "$t" "$@"
}
tokens() {  # "8k" -> 8192, "1500" -> 1500 (as xattention parses lengths)
    local n=${1,,}
    if [[ $n == *k ]]; then python3 -c "print(int(float('${n%k}') * 1024))"; else echo "$n"; fi
}
batch_for() {  # prompts per generate call at this many tokens
    if [ -n "$BATCH" ]; then echo "$BATCH"; elif [ "$MODEL" = gemma3-270m ] && [ "$1" -gt 8192 ]; then echo 48
    elif [ "$MODEL" = gemma3-270m ]; then echo 96; else echo 192; fi
}

mkdir -p "$OUT/thresholds" || exit 1
echo "model $MODEL, lengths $LENGTHS, calibration tasks $CAL_TASKS (seed 1), held-out tasks $HELDOUT, out $OUT"
for length in ${LENGTHS//,/ }; do
    n=$(tokens "$length") || die "bad length $length"
    methods=(--methods dense)
    for g in ${GLOBALS//,/ }; do methods+=(--methods "xattention:stride=8,threshold=$g"); done
    files=0
    first_tau=${TAUS%% *}
    for statistic in mass answer_mass; do
        base="$OUT/thresholds/$SAFE_MODEL-$n-$statistic-head-tau$first_tau.json"
        if [ ! -f "$base" ]; then
            [ "$(left)" -ge "$CAL_RESERVE" ] || stop "$(left) s left, too few to calibrate $base"
            echo "== calibrate $base"
            timed "${XA[@]}" calibrate "${COMMON[@]}" --lengths "$n" --tasks "$CAL_TASKS" --seed 1 \
                --samples "$CAL_SAMPLES" --statistic "$statistic" --per head --target "density=tau:$first_tau" \
                --stride 8 --out "$base.part" --no-progress
            rc=$?
            [ $rc -eq 124 ] || [ $rc -eq 130 ] && stop "the time budget stopped calibrating $base"
            [ $rc -eq 0 ] || { echo "calibration_heldout.sh: calibrate failed (exit $rc)" >&2; exit "$rc"; }
            mv "$base.part" "$base"  # only a finished file counts as done
        fi
        for tau in $TAUS; do
            for per in head layer; do
                file="$OUT/thresholds/$SAFE_MODEL-$n-$statistic-$per-tau$tau.json"
                if [ ! -f "$file" ]; then  # from base's tables: no model run
                    timed "${XA[@]}" calibrate --from "$base" --target "density=tau:$tau" --per "$per" --out "$file.part"
                    rc=$?
                    [ $rc -eq 124 ] || [ $rc -eq 130 ] && stop "the time budget stopped re-choosing $file"
                    [ $rc -eq 0 ] || { echo "calibration_heldout.sh: calibrate --from failed (exit $rc)" >&2; exit "$rc"; }
                    mv "$file.part" "$file"
                fi
                methods+=(--methods "xattention:stride=8,thresholds=$file")
                files=$((files + 1))
            done
        done
    done
    budget=$(($(left) - MARGIN))
    [ "$budget" -gt 0 ] || stop "$(left) s left, too few to evaluate at $n tokens"
    echo "== eval at $n tokens: dense, global tau $GLOBALS and $files thresholds files; $SAMPLES samples (time budget $budget s)"
    timed "${XA[@]}" eval "${COMMON[@]}" --tasks "$HELDOUT" --lengths "$n" --samples "$SAMPLES" \
        --batch-size "$(batch_for "$n")" $MASS --time-budget "$budget" --out "$OUT" --no-progress "${methods[@]}"
    rc=$?
    case $rc in
        0) ;;
        3|124|130) stop "the time budget stopped the evaluation at $n tokens (exit $rc)" ;;
        *) echo "calibration_heldout.sh: eval failed (exit $rc)" >&2; exit "$rc" ;;
    esac
done
echo "== report"
"${XA[@]}" eval report "$OUT" || exit $?
echo "done: $OUT/summary.md"
