#!/usr/bin/env bash
# Chaos runs: many supervised imports under random SIGKILLs, each checked by scripts/audit.py
# from its store and its database (not from the report), and one verdict line at the end.
#
#   scripts/chaos.sh [RUNS] [SEED]        (defaults: 50 runs, seed 1)
#
# Run it inside the project's virtualenv: it calls `python` from PATH (or $PYTHON), from the
# repository root, so `python -m supervisor` and `python scripts/audit.py` are this checkout's.
#
# Each run draws from SEED (reproducibly, through bash's seeded $RANDOM): a record count
# (500-5000), a batch size (10-200), a number of random kills (0-8) and their seed, in about
# one run out of four a SIGKILL of the supervisor itself after a short random delay, and in
# about one run out of five a stall: the worker is SIGSTOPped after a short random delay (or the
# next worker, if none runs at that moment). Then:
#   python -m supervisor run --state-dir DIR --records N --batch-size B --kill-random K --seed S --json
# in a fresh `mktemp -d` state dir (removed afterwards; CHAOS_KEEP_FAILED=1 keeps failed ones).
# After a supervisor kill, its worker must die within 5 s (PR_SET_PDEATHSIG), and the same
# command is run again to finish the import. In a stall run that command also gets
# `--stall-timeout 2`: the supervisor must SIGKILL the stopped worker (a stopped worker that
# outlives its run is a violation) and finish. Then the audit checks the invariants of DESIGN.md.
#
# The verdict sums, over all runs: kills = the workers' SIGKILLs in the final reports (the kills
# of ours and of stalled workers) plus the supervisor SIGKILLs (the kills in the middle of a
# store write, of the supervisor and of stalled workers are also shown apart); lost,
# reruns_of_completed_batches and duplicate_rows from the audits; violations = audit violations
# plus failed runs, report/sink mismatches, orphaned workers and stopped workers left behind.
# Exit status: 0 when the verdict is PASS, 1 on any violation, 2 on a usage error.

set -u -o pipefail

usage() { echo "usage: scripts/chaos.sh [RUNS] [SEED]   (RUNS >= 1, SEED an integer)" >&2; exit 2; }
[[ $# -le 2 ]] || usage
RUNS=${1:-50}
SEED=${2:-1}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 && $SEED =~ ^-?[0-9]+$ ]] || usage

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "chaos: '$PY' not found; run inside the project's venv" >&2; exit 2; }

ORPHAN_DEADLINE_TENTHS=50
STALL_TIMEOUT_S=2
work=""
background=""
stopped=""  # "pid:start-time" of the workers this script SIGSTOPped in the current run

cleanup() {
    [[ -n $background ]] && kill -KILL "$background" 2>/dev/null
    kill_stopped_left >/dev/null
    [[ -n $work && -d $work ]] && rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The live child pids of $1, and whether pid $1 still runs code (not gone, not a zombie); from
# /proc, so that nothing beyond bash and Linux is needed.
children_of() {
    local stat rest state ppid p
    for p in /proc/[0-9]*; do
        { stat=$(<"$p/stat"); } 2>/dev/null || continue
        rest=${stat##*) }
        read -r state ppid _ <<<"$rest"
        [[ $ppid == "$1" && $state != Z ]] && echo "${p#/proc/}"
    done
}

is_running() {
    local stat rest state
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    rest=${stat##*) }
    read -r state _ <<<"$rest"
    [[ $state != Z ]]
}

# The start time of pid $1 (in clock ticks since boot): with the pid, it names one process even
# if the pid is reused later.
start_time_of() {
    local stat fields
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    read -ra fields <<<"${stat##*) }"
    echo "${fields[19]}"
}

# Whether "pid:start-time" $1 still runs code (the very process, not a later one with its pid).
is_still() {
    is_running "${1%%:*}" && [[ $(start_time_of "${1%%:*}") == "${1##*:}" ]]
}

# SIGKILL any worker this script stopped that still runs (SIGKILL ends a stopped process too);
# prints how many there were.
kill_stopped_left() {
    local left=0 entry
    for entry in $stopped; do
        if is_still "$entry"; then
            kill -KILL "${entry%%:*}" 2>/dev/null
            left=$((left + 1))
        fi
    done
    echo "$left"
}

# Fold one run's report and audit into
# "kills store_write_kills stall_kills lost reruns duplicates violations" and print the problems
# (one per line, prefixed "! ") on stderr.
summarize() {
    "$PY" - "$@" <<'EOF'
import json, sys

report_path, audit_path, records, returncode, extra_violations = sys.argv[1:6]
problems = []
try:
    report = json.loads(open(report_path).read())
except (OSError, ValueError):
    report = {}
    problems.append(f"no JSON report (exit {returncode})")
try:
    verdict = json.loads(open(audit_path).read())
except (OSError, ValueError):
    verdict = {"ok": False, "violations": ["the audit did not produce a verdict"]}
if returncode != "0" or report.get("ok") is not True:
    problems.append(f"the run failed (exit {returncode}): {report.get('error')}")
elif verdict.get("imported") is not None:
    for key, want in [("total_records", int(records)), ("total_processed", verdict["imported"]),
                      ("total_skipped", verdict["skipped"])]:
        if report.get(key) != want:
            problems.append(f"report {key} is {report.get(key)}, the sink says {want}")
problems += verdict.get("violations", [])
for p in problems:
    print(f"! {p}", file=sys.stderr)
kills = report.get("kills", [])
stalls = report.get("stalls", [])
print(len(kills) + len(stalls), sum(1 for k in kills if k.get("kind") == "store-write"), len(stalls),
      verdict.get("lost") or 0,
      verdict.get("reruns_of_completed_batches", 0), verdict.get("duplicate_rows", 0),
      len(problems) + int(extra_violations))
EOF
}

# Run "${cmd[@]}" with a short stall timeout in the background, SIGSTOP its worker after
# $stall_delay (or the next worker, if none runs then), and wait for it: sets returncode, and
# counts a stopped worker that outlived the run in extra_violations (and SIGKILLs it).
run_with_a_stall() {
    local workers worker started stopped_pids="" left
    what+=" stall-after=${stall_delay}s"
    "${cmd[@]}" --stall-timeout "$STALL_TIMEOUT_S" >"$work/report.json" 2>"$work/run.err" &
    background=$!
    sleep "$stall_delay"
    while workers=$(children_of "$background"); [[ -z $workers ]] && is_running "$background"; do
        sleep 0.01
    done
    for worker in $workers; do
        started=$(start_time_of "$worker") || continue
        kill -STOP "$worker" 2>/dev/null || continue
        stopped+=" $worker:$started"
        stopped_pids+=" $worker"
    done
    what+=" (stopped worker(s)${stopped_pids:- none})"
    wait "$background"
    returncode=$?
    background=""
    left=$(kill_stopped_left)
    stopped=""
    if ((left)); then
        echo "! $left stopped worker(s) outlived the run" >>"$work/problems"
        extra_violations=$((extra_violations + left))
    fi
}

RANDOM=$SEED
total_kills=0 total_store_write=0 total_supervisor=0 total_stall=0 total_lost=0 total_reruns=0 total_dupes=0 total_violations=0 done_runs=0

for ((run = 1; run <= RUNS; run++)); do
    # Draw everything first, whatever the branches below take, so a seed always means the same runs.
    records=$((500 + RANDOM % 4501))
    batch_size=$((10 + RANDOM % 191))
    kill_random=$((RANDOM % 9))
    kill_seed=$RANDOM
    supervisor_kill=$((RANDOM % 4 == 0))
    delay_ms=$((50 + RANDOM % 700))  # drawn here: $RANDOM inside $(...) draws in a subshell
    stall=$((RANDOM % 5 == 0))
    stall_delay_ms=$((20 + RANDOM % 380))
    delay=$(printf '0.%03d' "$delay_ms")
    stall_delay=$(printf '0.%03d' "$stall_delay_ms")

    work=$(mktemp -d "${TMPDIR:-/tmp}/chaos.XXXXXX")
    state="$work/state"
    cmd=("$PY" -m supervisor run --state-dir "$state" --records "$records" --batch-size "$batch_size"
         --kill-random "$kill_random" --seed "$kill_seed" --json)
    what="records=$records batch-size=$batch_size kill-random=$kill_random seed=$kill_seed"
    extra_violations=0
    supervisor_kills=0

    if ((supervisor_kill)); then
        what+=" supervisor-kill-after=${delay}s"
        "${cmd[@]}" >"$work/first.json" 2>"$work/first.err" &
        background=$!
        sleep "$delay"
        workers=$(children_of "$background")
        kill -KILL "$background" 2>/dev/null
        wait "$background" 2>/dev/null
        status=$?
        background=""
        if ((status == 137)); then
            supervisor_kills=1
            what+=" (worker(s) ${workers:-none})"
            for worker in $workers; do
                for ((t = 0; t < ORPHAN_DEADLINE_TENTHS; t++)); do
                    is_running "$worker" || break
                    sleep 0.1
                done
                if is_running "$worker"; then
                    echo "! worker $worker outlived its SIGKILLed supervisor" >>"$work/problems"
                    kill -KILL "$worker" 2>/dev/null
                    extra_violations=$((extra_violations + 1))
                fi
            done
        fi
    fi

    if ((stall)); then
        run_with_a_stall
    else
        "${cmd[@]}" >"$work/report.json" 2>"$work/run.err"
        returncode=$?
    fi
    root=$("$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])' <"$work/report.json" 2>/dev/null) \
        || root="import/synthetic-$records-b$batch_size"
    "$PY" scripts/audit.py --state-dir "$state" --id "$root" --records "$records" \
        >"$work/audit.json" 2>"$work/audit.err"

    read -r kills store_write stall_kills lost reruns dupes violations < <(
        summarize "$work/report.json" "$work/audit.json" "$records" "$returncode" \
            "$extra_violations" 2>>"$work/problems"
    )
    # A summary that could not be made counts as a violation (and contributes no figures).
    violations=${violations:-1} kills=${kills:-0} lost=${lost:-0} reruns=${reruns:-0} dupes=${dupes:-0}
    kills=$((kills + supervisor_kills))
    total_kills=$((total_kills + kills))
    total_store_write=$((total_store_write + ${store_write:-0}))
    total_supervisor=$((total_supervisor + supervisor_kills))
    total_stall=$((total_stall + ${stall_kills:-0}))
    total_lost=$((total_lost + lost))
    total_reruns=$((total_reruns + reruns))
    total_dupes=$((total_dupes + dupes))
    total_violations=$((total_violations + violations))
    done_runs=$run

    if ((violations)); then
        echo "chaos: run $run/$RUNS $what -> $violations VIOLATION(S)" >&2
        cat "$work/problems" >&2
        sed 's/^/    /' "$work/run.err" "$work/audit.err" | tail -20 >&2
        if [[ ${CHAOS_KEEP_FAILED:-0} == 1 ]]; then
            echo "    state kept in $work" >&2
            work=""
        fi
    else
        echo "chaos: run $run/$RUNS $what -> kills=$kills ok" >&2
    fi
    [[ -n $work ]] && rm -rf "$work"
    work=""
done

verdict=PASS
((total_violations + total_lost + total_reruns + total_dupes == 0)) || verdict=FAIL
echo "chaos: runs=$done_runs kills=$total_kills (store-write=$total_store_write" \
     "supervisor=$total_supervisor stall=$total_stall) lost=$total_lost" \
     "reruns_of_completed_batches=$total_reruns duplicate_rows=$total_dupes" \
     "violations=$total_violations -> $verdict"
[[ $verdict == PASS ]]
