#!/bin/bash
# Advance the issue-16 study on a GPU host of the device tool: one device `run` call = one run of this script.
#
#   run(command="bash benchmarks/study_gpu.sh 4c-pretrain 4c-ml45test20-full,4c-ml45test20-lora+4c-ml45test5-full,4c-ml45test5-lora",
#       carry=["wheels", ".simpkgs", ".gl", "runs/study/data/xemb_sims.tar.xz"], timeout_s=600)
#   ... then the same call again, at once, until status.txt says done for every row (about 3 calls for this lease)
#
# Arguments are stages, run in order; a stage is a row, or streams joined by `+` that run in parallel processes, each
# stream being rows joined by `,` in order, e.g. (4c lease A: the pretrain once, then two post-train streams at once):
#   bash benchmarks/study_gpu.sh 4c-pretrain 4c-ml45test20-full,4c-ml45test20-lora+4c-ml45test5-full,4c-ml45test5-lora
# Parallel rows are safe: a row's training and a data source's collection run under a lock, so rows that need the same
# pretrain or data wait for the process doing it and reuse it (chunkpolicy.study.runner). Only rows whose budget is
# optimizer steps belong in parallel streams (the 4c rows); 4a's 10-minute rows would get fewer steps when sharing.
# Rows of a parallel stage record gpu_shared_by = the number of streams: their training minutes, samples/s and chunk
# latency were measured on a shared GPU, and the aggregate counts 1/n of their GPU-minutes in the study's total.
#
# It sources benchmarks/gpu_env.sh (installs the carried wheels, MUJOCO_GL=egl; GPU_ENV=FILE sources another, e.g.
# /dev/null on a machine already set up), then runs the given rows in order,
# each `python -m chunkpolicy.study.cli run ROW --study $STUDY --session-minutes M --eval-reserve-minutes R`
# (= `chunkpolicy study run ...`), with M = the time left in this call less 45 s: training pauses there with
# a checkpoint, an evaluation starts only when R = EVAL_RESERVE_MIN minutes are left for it, and a `timeout` stops a
# row that overruns anyway (its collection and training resume; an evaluation cut off is redone). Rows already done
# (their benchmarks/results/study/<row>.json is in the working tree) are skipped in seconds.
#
# What comes back in $OUT (the tool returns at most 8 files): status.txt (per row: done / not done yet / failed, exit
# code, minutes), study_gpu.log (everything printed), study_results.tgz (benchmarks/results/study/*.json, every row's
# run record: summary.json, config.yaml, metrics.jsonl, init_from.json, eval results.json, data collection markers,
# LeRobot train logs; no checkpoints, videos or TensorBoard files), and the JSON of up to 4 rows finished in this call.
# Unpack the archive in the repository root after every call (`tar xzf study_results.tgz`): the finished rows'
# JSONs then travel with the next call's working tree and are skipped there (a call also restores the JSONs that
# earlier calls on the same machine finished, from runs/study/results_kept/, if the working tree lacks them).
#
# How a session uses it. Resuming needs the row's run directory (runs/study/..., ignored by git, kept on the machine
# while it is warm): call again within the tool's 30 s warm period with the same rows, until status.txt says done
# for all (exit 3 = not done yet). A machine is held at most 30 minutes and a fresh one starts bare, so everything that
# depends on a checkpoint (4b on 4a's flow_expert rows, 4c post-training on 4c-pretrain) runs in the lease that trains
# it: a row whose init_from_row / from_row checkpoint is missing trains it again first (its GPU time is counted). The
# lease plan in configs/study/issue16.yaml's header groups the rows that way.
#
# Simulators: Meta-World and ALOHA come from .simpkgs (gpu_env.sh unpacks every .simpkgs/*.tar.xz into site-packages:
# metaworld_pruned.tar.xz, and aloha_pruned.tar.xz = gym-aloha with the part of dm-control its tasks run on, built by
# scripts/build_aloha_pruned.sh). Fetch (gymnasium-robotics) is not on the host image. For 4c
# it is enough to carry the Fetch and ALOHA stores instead (ALOHA is only pretraining data there), collected on the
# CPU machine and packed small (the runner reuses a finished collection: store + .collect.json marker) by
# `bash scripts/build_gpu_carry.sh --xemb` (with the rest of the carry), and add runs/study/data/xemb_sims.tar.xz to
# carry: every runs/study/data/*.tar.xz is unpacked here (stores already there are kept). 4a's ALOHA rows use the simulator itself (collection and evaluation). status.txt lists what imports.
#
# Settings (environment): STUDY (default configs/study/issue16.yaml), CALL_MIN (minutes this call may use, default
# 9.3), EVAL_RESERVE_MIN (minutes an evaluation and the latency need before one may start, default 3.5: more than
# the longest evaluation of the study, or it is cut off and redone on every call).
set -u
t0=$(date +%s)
STUDY=${STUDY:-configs/study/issue16.yaml}
CALL_MIN=${CALL_MIN:-9.3}
EVAL_RESERVE_MIN=${EVAL_RESERVE_MIN:-3.5}
OUT=${OUT:-/tmp/study_out}
mkdir -p "$OUT"
LOG="$OUT/study_gpu.log"
STATUS="$OUT/status.txt"
: > "$STATUS"
if [ $# -eq 0 ]; then echo "usage: bash benchmarks/study_gpu.sh ROW [ROW ...]" >&2; exit 2; fi

source "${GPU_ENV:-benchmarks/gpu_env.sh}" >> "$LOG" 2>&1
end=$(python -c "print(int($t0 + 60 * $CALL_MIN))")
results_dir=$(python -c "from chunkpolicy.study.config import load_study; print(load_study('$STUDY').results_dir)" 2>>"$LOG")
data_dir=$(python -c "from chunkpolicy.study.config import load_study; print(load_study('$STUDY').out_dir / 'data')" 2>>"$LOG")
for f in "$data_dir"/*.tar.xz; do  # carried stores (see above), each with its marker; one already here is kept
  [ -f "$f" ] || continue
  tmp=$(mktemp -d) && tar xJf "$f" -C "$tmp"
  for st in "$tmp"/*.zarr; do
    name=$(basename "$st")
    if [ -e "$data_dir/$name" ] || [ -e "$data_dir/$name.collect.json" ]; then
      echo "kept $data_dir/$name (not replaced from $f)" >> "$LOG"
    elif [ -f "$st.collect.json" ]; then
      mv "$st" "$st.collect.json" "$data_dir/" && echo "unpacked $name from $f" >> "$LOG"
    fi
  done
  rm -rf "$tmp"
done
# row JSONs finished by an earlier call of this lease: the working tree that travels with a call replaces tracked files,
# so a JSON not yet unpacked here would be lost and its row finished again; keep copies in the ignored out dir
keep="$(dirname "$data_dir")/results_kept"
mkdir -p "$keep" "$results_dir"
for f in "$keep"/*.json; do
  [ -f "$f" ] || continue
  [ -f "$results_dir/$(basename "$f")" ] || { cp "$f" "$results_dir/" && echo "restored $(basename "$f") from $keep" >> "$STATUS"; }
done
{
  echo "study $STUDY, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  for m in metaworld gymnasium_robotics gym_aloha; do
    python -c "import $m" 2>/dev/null && echo "simulator $m: ok" || echo "simulator $m: MISSING (its data must be carried)"
  done
  echo "setup: $(( $(date +%s) - t0 )) s"
} >> "$STATUS"

# one row: its outcome goes to status.txt and to $STATE (done / notyet / failed lines, read after parallel streams)
STATE=$(mktemp)
run_one() {
  local row=$1 now left_min session r0 rc mins
  now=$(date +%s)
  left_min=$(python -c "print(round(($end - $now) / 60, 2))")
  session=$(python -c "print(round($left_min - 0.75, 2))")
  if ! python -c "import sys; sys.exit(0 if $session >= 1.5 else 1)"; then
    echo "$row: not started ($left_min min left in this call)" >> "$STATUS"; echo "notyet $row" >> "$STATE"
    return 3
  fi
  echo "=== $row: session $session min (call time left $left_min min) ===" >> "$LOG"
  r0=$(date +%s)
  # the hard stop: the row's own deadline ends it ~30 s earlier (a paused training writes its checkpoint in that time);
  # every line of its output is prefixed with the row's name (parallel streams share the log)
  timeout --signal=TERM --kill-after=10 $(( end - now - 15 )) \
    python -m chunkpolicy.study.cli run "$row" --study "$STUDY" --session-minutes "$session" \
    --eval-reserve-minutes "$EVAL_RESERVE_MIN" 2>&1 | sed -u "s/^/$row | /" >> "$LOG"
  rc=${PIPESTATUS[0]}
  mins=$(python -c "print(round(($(date +%s) - $r0) / 60, 1))")
  case $rc in
    0) echo "$row: done ($mins min)" >> "$STATUS"; echo "done $row" >> "$STATE"; return 0 ;;
    3) echo "$row: not done yet, session time up ($mins min); call again with the same rows" >> "$STATUS" ;;
    124|137) echo "$row: stopped by the call's time limit ($mins min); call again (it resumes)" >> "$STATUS" ;;
    *) echo "$row: FAILED with exit code $rc ($mins min); see study_gpu.log" >> "$STATUS"
       grep "^$row | " "$LOG" | tail -5 | sed 's/^/    /' >> "$STATUS"; echo "failed $row" >> "$STATE"; return 1 ;;
  esac
  echo "notyet $row" >> "$STATE"; return 3
}
# one stream: ROW,ROW,... in order; it stops at a row that is not done (a later row may need it), goes on after a failure
run_stream() {
  local rows row
  IFS=, read -ra rows <<< "$1"
  for row in "${rows[@]}"; do
    run_one "$row"; [ $? -eq 3 ] && return 3
  done
  return 0
}
for stage in "$@"; do  # stages in order; STREAM+STREAM+... run in parallel processes
  IFS=+ read -ra streams <<< "$stage"
  if [ ${#streams[@]} -eq 1 ]; then
    run_stream "$stage" || { [ $? -eq 3 ] && break; }
  else
    echo "=== parallel streams: ${streams[*]} ===" >> "$LOG"
    pids=()
    # the rows record that n processes shared the GPU (their minutes and latency are not solo figures)
    for st in "${streams[@]}"; do ( export CHUNKPOLICY_STUDY_SHARED_GPU=${#streams[@]}; run_stream "$st" ) & pids+=($!); done
    notyet=0
    for pid in "${pids[@]}"; do wait "$pid" || { [ $? -eq 3 ] && notyet=1; }; done
    [ $notyet -eq 1 ] && break
  fi
done
finished=($(awk '$1 == "done" {print $2}' "$STATE"))
code=0  # 0: every row done; 3: some not done yet (call again); 1: a row failed
grep -q "^notyet " "$STATE" && code=3
grep -q "^failed " "$STATE" && code=1
rm -f "$STATE"

cp "$results_dir"/*.json "$keep"/ 2>/dev/null
# results: the row JSONs and the small per-row records, never checkpoints, videos or TensorBoard event files
files=$( { ls "$results_dir"/*.json 2>/dev/null
           find runs/study/rows -maxdepth 4 -type f \( -name summary.json -o -name config.yaml -o -name metrics.jsonl \
                -o -name init_from.json -o -name results.json -o -name train.log -o -name train.sessions.json \
                -o -name chunkpolicy_study_train.json \) -not -path '*/checkpoints/*' 2>/dev/null
           ls runs/study/data/*.collect.json 2>/dev/null; } )
if [ -n "$files" ]; then
  echo "$files" | tar czf "$OUT/study_results.tgz" -T - 2>> "$LOG"
  size=$(stat -c %s "$OUT/study_results.tgz")
  if [ "$size" -gt 15000000 ]; then  # the tool returns files up to 16 MiB: keep the row JSONs and summaries
    echo "$files" | grep -v -e metrics.jsonl -e '/eval/' | tar czf "$OUT/study_results.tgz" -T - 2>> "$LOG"
    echo "study_results.tgz: $size bytes with metrics and eval records; those were left out" >> "$STATUS"
  fi
fi
n=0
for row in "${finished[@]}"; do
  [ $n -lt 4 ] && [ -f "$results_dir/$row.json" ] && cp "$results_dir/$row.json" "$OUT/" && n=$((n + 1))
done
echo "call: $(( $(date +%s) - t0 )) s, exit code $code" >> "$STATUS"
cat "$STATUS"
exit $code
