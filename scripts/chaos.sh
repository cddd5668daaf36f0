#!/usr/bin/env bash
# Chaos runs: many supervised imports under random SIGKILLs, each checked by scripts/audit.py
# from its store and its database (not from the report), and one verdict line at the end.
#
#   scripts/chaos.sh [--workers N] [RUNS] [SEED]        (defaults: 1 worker, 50 runs, seed 1)
#
# Run it inside the project's virtualenv: it calls `python` from PATH (or $PYTHON), from the
# repository root, so `python -m supervisor` and `python scripts/audit.py` are this checkout's.
#
# Each run draws from SEED (reproducibly, through bash's seeded $RANDOM): a record count
# (500-5000), a batch size (10-200), a number of random kills (0-8) and their seed, in about
# one run out of four a SIGKILL of the supervisor itself after a short random delay, and in
# about one run out of five a stall: the worker is SIGSTOPped after a short random delay (or the
# next worker, if none runs at that moment), and in about one run out of five a full disk: the
# first run gets a file size limit (RLIMIT_FSIZE, through util-linux's prlimit) drawn to be reached
# between its fourth batch and its end. Then:
#   python -m supervisor run --state-dir DIR --records N --batch-size B --kill-random K --seed S \
#       --workers W --json
# in a fresh `mktemp -d` state dir (removed afterwards; CHAOS_KEEP_FAILED=1 keeps failed ones).
# A run under a file size limit must finish (the limit was not reached) or, within 120 s, exit 1
# with a last line `error: ...` naming store.jsonl or import.db and no traceback. Then, as an
# operator would, `python -m supervisor retry --id ID --state-dir DIR` if the error says to, and
# the rest of the run goes on without the limit; what was resolved when the disk filled (the
# promises in the store, the commit rows in the sink) must be unchanged at the end.
# With --workers above 1, each worker runs W batches at once in a pool of processes, and about
# half of the random kills that are not store-write kills take one pool process instead of the
# whole worker (the worker runs on); the audit gets --workers too.
# After a supervisor kill, its worker and the worker's pool must die within 5 s
# (PR_SET_PDEATHSIG), and the same command is run again to finish the import. In a stall run
# that command also gets `--stall-timeout 2`: the supervisor must SIGKILL the stopped worker (a
# stopped worker that outlives its run is a violation) and finish. Then the audit checks the invariants of DESIGN.md,
# and every run must leave no `.compact` temp file and no process running on its state dir.
#
# The verdict sums, over all runs: kills = the SIGKILLs in the final reports (the kills of ours,
# of workers and of pool processes, and of stalled workers) plus the supervisor SIGKILLs (the
# kills in the middle of a store write, of the supervisor, of pool processes and of stalled
# workers are also shown apart); disk-full = the
# runs whose disk filled and that ended as they should; lost, reruns_of_completed_batches and
# duplicate_rows from the audits; violations = audit violations plus failed runs, report/sink
# mismatches, orphaned workers, stopped workers and other processes left behind, a full disk
# handled otherwise than above, a resolved promise or commit row changed after the disk filled,
# and leftover `.compact` files.
#
#   scripts/chaos.sh --store postgresql://USER@HOST:PORT/DB [RUNS] [SEED]
#
# runs the import on several machines sharing a PostgreSQL server instead: each run creates a
# database of its own on that server (through the URL's database, as its user) and drops it
# after. It draws a record count (500-5000), a batch size (10-200), 2 or 3 machines, 0-6 kills
# and their seed, and up to 0-2 random kills each machine's supervisor makes of its own; then
# scripts/machines.py runs the machines (one `python -m supervisor run --store URL`, the others
# `join`, 1 or 2 executors each; as root, each in a pid namespace of its own) and SIGKILLs, at
# seeded moments, a whole machine, a machine's supervisor alone (everything under it must die
# with it within 5 s), one executor, or the driver (the worker holding the workflow's lease),
# starting each dead machine again with the same command; every participant must end 0 with
# the import's result, and nothing of a dead machine may outlive it. Then
#   python scripts/audit.py --store URL --id ID --records N --workers EXECUTORS
# checks the invariants from the database alone. The verdict line has the same fields, and two
# more in its parentheses: machine= and driver= (the whole machines and the drivers killed);
# supervisor= counts the supervisors killed alone, pool= the executors killed (by this script or
# by a supervisor's own random kills); a PostgreSQL store has no store line to tear, and no
# stall or full disk is made: store-write, stall and disk-full stay 0. violations = the
# machines' problems (a participant that did not end 0 with the import's result, a process
# left behind, a run that did not finish in time) plus the audit's violations and report/sink
# mismatches. With CHAOS_KEEP_FAILED=1 a failed run keeps its directory and its database.
# Exit status: 0 when the verdict is PASS, 1 on any violation, 2 on a usage error.

set -u -o pipefail

usage() {
    echo "usage: scripts/chaos.sh [--workers N] [RUNS] [SEED]   (N from 1 to 64, RUNS >= 1, SEED an integer)" >&2
    echo "       scripts/chaos.sh --store postgresql://... [RUNS] [SEED]   (machines sharing that server)" >&2
    exit 2
}
WORKERS=1
STORE=""
workers_given=0
positional=()
while (($#)); do
    case $1 in
        --workers) [[ $# -ge 2 ]] || usage; WORKERS=$2; workers_given=1; shift 2 ;;
        --workers=*) WORKERS=${1#*=}; workers_given=1; shift ;;
        --store) [[ $# -ge 2 ]] || usage; STORE=$2; shift 2 ;;
        --store=*) STORE=${1#*=}; shift ;;
        -[0-9]*) positional+=("$1"); shift ;;  # a negative seed
        -*) usage ;;
        *) positional+=("$1"); shift ;;
    esac
done
[[ ${#positional[@]} -le 2 ]] || usage
RUNS=${positional[0]:-50}
SEED=${positional[1]:-1}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 && $SEED =~ ^-?[0-9]+$ ]] || usage
[[ $WORKERS =~ ^[0-9]+$ ]] && ((WORKERS >= 1 && WORKERS <= 64)) || usage
[[ -z $STORE || ($STORE =~ ^postgres(ql)?:// && $workers_given == 0) ]] || usage

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "chaos: '$PY' not found; run inside the project's venv" >&2; exit 2; }
command -v prlimit >/dev/null && command -v timeout >/dev/null \
    || { echo "chaos: prlimit (util-linux) and timeout (coreutils) are needed" >&2; exit 2; }

ORPHAN_DEADLINE_TENTHS=50
STALL_TIMEOUT_S=2
DISK_FULL_DEADLINE_S=120
# Under a file size limit, the file that grows fastest is SQLite's write-ahead log, import.db-wal
# (the store grows by ~500 B a batch): ~40 kB at the start, then per batch ~38 kB plus up to
# ~80 kB more for bigger batches (measured); it stops growing at its checkpoint (~4.1 MB).
WAL_START_BYTES=40000
WAL_CHECKPOINT_BYTES=3900000
work=""
run_database=""  # with --store: the current run's database, dropped at the end
background=""
stopped=""  # "pid:start-time" of the workers this script SIGSTOPped in the current run

cleanup() {
    [[ -n $background ]] && kill -KILL "$background" 2>/dev/null
    kill_stopped_left >/dev/null
    [[ -n $work && -d $work ]] && rm -rf "$work"
    [[ -n $run_database ]] && database "$STORE" "$run_database" drop >/dev/null
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

# The live pids that have $1 among their arguments (a supervisor or worker of state dir $1).
running_on() {
    local p args arg
    for p in /proc/[0-9]*; do
        { mapfile -d '' -t args <"$p/cmdline"; } 2>/dev/null || continue
        for arg in "${args[@]}"; do
            if [[ $arg == "$1" ]]; then
                is_running "${p#/proc/}" && echo "${p#/proc/}"
                break
            fi
        done
    done
}

# A file size limit that the import of $1 records in batches of $2 should reach in the middle
# of batch k, k drawn from $3 between the fourth batch and the last (or the WAL's checkpoint).
disk_full_limit() {
    local batches=$((($1 + $2 - 1) / $2)) per_batch=$((27000 + 40000 * $2 / ($2 + 60))) first last
    last=$(((WAL_CHECKPOINT_BYTES - WAL_START_BYTES) / per_batch))
    ((last > batches - 1)) && last=$((batches - 1))
    first=$((last < 3 ? last : 3))
    echo $((WAL_START_BYTES + (first + $3 % (last - first + 1)) * per_batch + per_batch / 2))
}

# With one argument, state dir $1: print what is resolved there as JSON (the store's resolved
# promises with their values and settle times, the sink's commit rows). With a second, such a
# JSON file: print (prefixed "! ") each of its entries that is no longer the same.
settled() {
    "$PY" - "$@" <<'EOF'
import json, sqlite3, sys
from pathlib import Path

sys.path.insert(0, "scripts")
from audit import load_store

state = Path(sys.argv[1])
store, sink = state / "store.jsonl", state / "import.db"
now = {"promise": {}, "commit row": {}}
if store.exists():
    now["promise"] = {pid: [p["value"], p["settled_at"]] for pid, p in load_store(store).items()
                      if p["state"] == "resolved"}
if sink.exists():  # read-only: closing must not checkpoint the log between two runs
    db = sqlite3.connect(f"file:{sink}?mode=ro", uri=True)
    now["commit row"] = {row[0]: list(row[1:]) for row in db.execute("SELECT * FROM batch_commits")}
    db.close()
if len(sys.argv) == 2:
    print(json.dumps(now))
    sys.exit()
before = json.loads(Path(sys.argv[2]).read_text())
for kind, entries in before.items():
    for key, was in entries.items():
        if now[kind].get(key) != was:
            print(f"! {kind} {key}, {was} when the disk filled, is now {now[kind].get(key)}")
EOF
}

# How many batches' commit rows the snapshot of `settled` in $1 holds.
committed_batches() {
    "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)["commit row"]))' <"$1"
}

# The import's id from the report in $1 (the id the synthetic input gets, if there is none).
root_of() {
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])' <"$1" 2>/dev/null \
        || echo "import/synthetic-$records"
}

# Fold one run's report and audit into
# "kills store_write_kills pool_kills stall_kills lost reruns duplicates violations" and print the problems
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
print(len(kills) + len(stalls), sum(1 for k in kills if k.get("kind") == "store-write"),
      sum(1 for k in kills if k.get("kind") == "pool"), len(stalls),
      verdict.get("lost") or 0,
      verdict.get("reruns_of_completed_batches", 0), verdict.get("duplicate_rows", 0),
      len(problems) + int(extra_violations))
EOF
}

# Run "${cmd[@]}" under a file size limit of $disk_full_limit bytes: it must finish, or end as a
# full disk should (see the header) and be retried if its error says so. Saves what is resolved
# then in $work/settled.json; sets disk_full to 1 if the disk filled and the run ended as it
# should, and counts anything else in extra_violations.
run_into_a_full_disk() {
    local status last problem="" log="$work/disk-full.err"
    what+=" disk-full-limit=$disk_full_limit"
    timeout --foreground -k 5 "$DISK_FULL_DEADLINE_S" prlimit --fsize="$disk_full_limit" -- "${cmd[@]}" \
        >"$work/disk-full.json" 2>"$work/disk-full.err"
    status=$?
    last=$(tail -n 1 "$work/disk-full.err")
    if ! settled "$state" >"$work/settled.json" 2>"$work/settled.err"; then
        problem="could not read what was resolved after the run under a file size limit"
        log="$work/settled.err"
    elif ((status == 0)); then
        what+=" (limit not reached)"
    elif ((status == 124 || status == 137)); then
        problem="the run under a file size limit did not end within ${DISK_FULL_DEADLINE_S} s"
    elif ((status != 1)); then
        problem="the run under a file size limit exited $status, not 1"
    elif grep -q '^Traceback' "$work/disk-full.err"; then
        problem="the run under a file size limit printed a traceback"
    elif [[ $last != "error: "* || ($last != *"$state/store.jsonl"* && $last != *"$state/import.db"*) ]]; then
        problem="the run under a file size limit did not end with an error naming store.jsonl or import.db"
    else
        disk_full=1
        [[ $last == *"$state/store.jsonl"* ]] && what+=" (store.jsonl full" || what+=" (import.db full"
        what+=" after $(committed_batches "$work/settled.json") batch(es)"
        if [[ $last == *"supervisor retry"* ]]; then
            what+=", retried"
            "$PY" -m supervisor retry --id "$(root_of "$work/disk-full.json")" --state-dir "$state" \
                >/dev/null 2>"$work/retry.err" \
                || problem="\`supervisor retry\` after the full disk failed" log="$work/retry.err"
        fi
        what+=")"
    fi
    if [[ -n $problem ]]; then
        echo "! $problem; ${log##*/} ends:" >>"$work/problems"
        tail -n 5 "$log" | sed 's/^/    /' >>"$work/problems"
        extra_violations=$((extra_violations + 1))
    fi
}

# After the run: a resolved promise or commit row changed since the disk filled, a `.compact`
# temp file left in the state dir, or a process still running on it (SIGKILLed, after up to 5 s)
# is a violation: counted in extra_violations.
check_what_is_left() {
    local changes leftovers t file pid
    if [[ -f $work/settled.json ]]; then
        changes=$(settled "$state" "$work/settled.json" 2>&1) \
            || changes="! could not compare what was resolved when the disk filled: ${changes##*$'\n'}"
        if [[ -n $changes ]]; then
            echo "$changes" >>"$work/problems"
            extra_violations=$((extra_violations + $(wc -l <<<"$changes")))
        fi
    fi
    for file in "$state"/*.compact; do
        [[ -e $file ]] || continue
        echo "! a compaction's temp file was left behind: $file" >>"$work/problems"
        extra_violations=$((extra_violations + 1))
    done
    for ((t = 0; t < ORPHAN_DEADLINE_TENTHS; t++)); do
        leftovers=$(running_on "$state")
        [[ -z $leftovers ]] && return
        sleep 0.1
    done
    for pid in $leftovers; do
        echo "! process $pid still runs on the state dir after the run" >>"$work/problems"
        kill -KILL "$pid" 2>/dev/null
        extra_violations=$((extra_violations + 1))
    done
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

# With --store: create (`create`, printing its URL) or drop (`drop`, its sessions ended first)
# the database $2 on the server of URL $1.
database() {
    "$PY" - "$@" <<'EOF'
import sys
import urllib.parse

import psycopg

url, name, action = sys.argv[1:4]
with psycopg.connect(url, autocommit=True, connect_timeout=10) as admin:
    if action == "create":
        admin.execute(f'CREATE DATABASE "{name}"')
        print(urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl())
    else:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
EOF
}

# Fold one --store run's result (scripts/machines.py's JSON line) and audit into
# "kills supervisor pool machine driver lost reruns duplicates violations" and print the
# problems (one per line, prefixed "! ") on stderr.
summarize_machines() {
    "$PY" - "$@" <<'EOF'
import json, sys

result_path, audit_path, returncode = sys.argv[1:4]
problems = []
try:
    result = json.loads(open(result_path).read())
except (OSError, ValueError):
    result = {}
    problems.append(f"no JSON result from scripts/machines.py (exit {returncode})")
try:
    verdict = json.loads(open(audit_path).read())
except (OSError, ValueError):
    verdict = {"ok": False, "violations": ["the audit did not produce a verdict"]}
problems += result.get("problems", [])
if result and returncode != "0" and not result.get("problems"):
    problems.append(f"scripts/machines.py exited {returncode}")
if verdict.get("imported") is not None:
    for m in result.get("machines", []):
        totals = m["starts"][-1]["totals"] if m["starts"] else {}
        for key, want in [("total_processed", verdict["imported"]), ("total_skipped", verdict["skipped"])]:
            if totals.get(key) is not None and totals[key] != want:
                problems.append(f"{m['name']} reports {key} {totals[key]}, the sink says {want}")
problems += verdict.get("violations", [])
for p in problems:
    print(f"! {p}", file=sys.stderr)
ours = result.get("kills", {})
theirs = [kind for m in result.get("machines", []) for start in m["starts"] for kind in start["supervisor_kills"]]
print(sum(ours.values()) + len(theirs), ours.get("supervisor", 0),
      ours.get("executor", 0) + theirs.count("pool"), ours.get("machine", 0), ours.get("driver", 0),
      verdict.get("lost") or 0, verdict.get("reruns_of_completed_batches", 0),
      verdict.get("duplicate_rows", 0), len(problems))
EOF
}

# With --store: RUNS runs on machines sharing the server, each in a database of its own (see
# the header), then the verdict line.
# Adds the run's audited figures (kills lost reruns dupes violations, set by the caller) to
# the totals and reports the run on stderr, with the problems and the last lines of the files
# named when it broke an invariant: then it returns 1, so that the caller may keep what it left.
tally_run() {  # tally_run ERR_FILE...
    total_kills=$((total_kills + kills))
    total_lost=$((total_lost + lost))
    total_reruns=$((total_reruns + reruns))
    total_dupes=$((total_dupes + dupes))
    total_violations=$((total_violations + violations))
    done_runs=$run
    if ((violations)); then
        echo "chaos: run $run/$RUNS $what -> $violations VIOLATION(S)" >&2
        cat "$work/problems" >&2
        sed 's/^/    /' "$@" | tail -20 >&2
        return 1
    fi
    echo "chaos: run $run/$RUNS $what -> kills=$kills ok" >&2
}

# PASS when no run broke an invariant, else FAIL.
verdict() {
    if ((total_violations + total_lost + total_reruns + total_dupes == 0)); then echo PASS; else echo FAIL; fi
}

store_runs() {
    local records batch_size machine_count kills kill_random kill_seed url root executors status
    local t leftovers pid state supervisor pool machine driver lost reruns dupes violations
    local total_kills=0 total_supervisor=0 total_pool=0 total_machine=0 total_driver=0 total_lost=0
    local total_reruns=0 total_dupes=0 total_violations=0 done_runs=0
    RANDOM=$SEED
    for ((run = 1; run <= RUNS; run++)); do
        records=$((500 + RANDOM % 4501))
        batch_size=$((10 + RANDOM % 191))
        machine_count=$((2 + RANDOM % 2))
        kills=$((RANDOM % 7))
        kill_random=$((RANDOM % 3))
        kill_seed=$RANDOM
        work=$(mktemp -d "${TMPDIR:-/tmp}/chaos.XXXXXX")
        what="records=$records batch-size=$batch_size machines=$machine_count kills=$kills"
        what+=" kill-random=$kill_random seed=$kill_seed"
        if ! url=$(database "$STORE" "chaos_$$_${run}_$kill_seed" create 2>"$work/database.err"); then
            echo "chaos: cannot create a database on $STORE: $(tail -n 1 "$work/database.err")" >&2
            exit 2
        fi
        run_database="chaos_$$_${run}_$kill_seed"
        root="import/synthetic-$records"
        timeout -k 5 300 "$PY" scripts/machines.py --store "$url" --records "$records" \
            --batch-size "$batch_size" --seed "$kill_seed" --machines "$machine_count" --kills "$kills" \
            --kill-random "$kill_random" --work "$work/machines" >"$work/machines.json" 2>"$work/machines.err"
        status=$?
        executors=$("$PY" -c 'import json, sys; print(json.load(sys.stdin)["executors"])' \
            <"$work/machines.json" 2>/dev/null)
        "$PY" scripts/audit.py --store "$url" --id "$root" --records "$records" \
            ${executors:+--workers "$executors"} >"$work/audit.json" 2>"$work/audit.err"
        extra_violations=0
        for state in "$work"/machines/machine-*/state; do
            for ((t = 0; t < ORPHAN_DEADLINE_TENTHS; t++)); do
                leftovers=$(running_on "$state")
                [[ -z $leftovers ]] && break
                sleep 0.1
            done
            for pid in $leftovers; do
                echo "! process $pid still runs on $state after the run" >>"$work/problems"
                kill -KILL "$pid" 2>/dev/null
                extra_violations=$((extra_violations + 1))
            done
        done

        read -r kills supervisor pool machine driver lost reruns dupes violations < <(
            summarize_machines "$work/machines.json" "$work/audit.json" "$status" 2>>"$work/problems"
        )
        # A summary that could not be made counts as a violation (and contributes no figures).
        violations=$((${violations:-1} + extra_violations)) kills=${kills:-0} lost=${lost:-0}
        reruns=${reruns:-0} dupes=${dupes:-0}
        total_supervisor=$((total_supervisor + ${supervisor:-0}))
        total_pool=$((total_pool + ${pool:-0}))
        total_machine=$((total_machine + ${machine:-0}))
        total_driver=$((total_driver + ${driver:-0}))
        if ! tally_run "$work/machines.err" "$work/audit.err" && [[ ${CHAOS_KEEP_FAILED:-0} == 1 ]]; then
            echo "    kept: $work and the database $url" >&2
            work="" run_database=""
        fi
        [[ -n $work ]] && rm -rf "$work"
        [[ -n $run_database ]] && database "$STORE" "$run_database" drop >/dev/null
        work="" run_database=""
    done

    local verdict
    verdict=$(verdict)
    echo "chaos: runs=$done_runs kills=$total_kills (store-write=0 supervisor=$total_supervisor" \
         "pool=$total_pool stall=0 disk-full=0 machine=$total_machine driver=$total_driver) lost=$total_lost" \
         "reruns_of_completed_batches=$total_reruns duplicate_rows=$total_dupes" \
         "violations=$total_violations -> $verdict"
    [[ $verdict == PASS ]]
}

if [[ -n $STORE ]]; then
    store_runs
    exit
fi

RANDOM=$SEED
total_kills=0 total_store_write=0 total_supervisor=0 total_pool=0 total_stall=0 total_disk_full=0 total_lost=0 total_reruns=0 total_dupes=0 total_violations=0 done_runs=0

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
    disk_full_run=$((RANDOM % 5 == 0))
    disk_full_draw=$RANDOM
    delay=$(printf '0.%03d' "$delay_ms")
    stall_delay=$(printf '0.%03d' "$stall_delay_ms")
    disk_full_limit=$(disk_full_limit "$records" "$batch_size" "$disk_full_draw")

    work=$(mktemp -d "${TMPDIR:-/tmp}/chaos.XXXXXX")
    state="$work/state"
    cmd=("$PY" -m supervisor run --state-dir "$state" --records "$records" --batch-size "$batch_size"
         --kill-random "$kill_random" --seed "$kill_seed" --workers "$WORKERS" --json)
    what="records=$records batch-size=$batch_size kill-random=$kill_random seed=$kill_seed"
    ((WORKERS > 1)) && what+=" workers=$WORKERS"
    extra_violations=0
    supervisor_kills=0
    disk_full=0

    ((disk_full_run)) && run_into_a_full_disk

    if ((supervisor_kill)); then
        what+=" supervisor-kill-after=${delay}s"
        "${cmd[@]}" >"$work/first.json" 2>"$work/first.err" &
        background=$!
        sleep "$delay"
        workers=$(children_of "$background")
        pool=$(for worker in $workers; do children_of "$worker"; done)
        kill -KILL "$background" 2>/dev/null
        wait "$background" 2>/dev/null
        status=$?
        background=""
        if ((status == 137)); then
            supervisor_kills=1
            what+=" (worker(s) ${workers:-none}"
            [[ -n $pool ]] && what+=", pool ${pool//$'\n'/ }"
            what+=")"
            for worker in $workers $pool; do
                for ((t = 0; t < ORPHAN_DEADLINE_TENTHS; t++)); do
                    is_running "$worker" || break
                    sleep 0.1
                done
                if is_running "$worker"; then
                    echo "! worker or pool process $worker outlived its SIGKILLed supervisor" >>"$work/problems"
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
    "$PY" scripts/audit.py --state-dir "$state" --id "$(root_of "$work/report.json")" --records "$records" \
        --workers "$WORKERS" >"$work/audit.json" 2>"$work/audit.err"
    check_what_is_left

    read -r kills store_write pool_kills stall_kills lost reruns dupes violations < <(
        summarize "$work/report.json" "$work/audit.json" "$records" "$returncode" \
            "$extra_violations" 2>>"$work/problems"
    )
    # A summary that could not be made counts as a violation (and contributes no figures).
    violations=${violations:-1} kills=${kills:-0} lost=${lost:-0} reruns=${reruns:-0} dupes=${dupes:-0}
    kills=$((kills + supervisor_kills))
    total_store_write=$((total_store_write + ${store_write:-0}))
    total_supervisor=$((total_supervisor + supervisor_kills))
    total_pool=$((total_pool + ${pool_kills:-0}))
    total_stall=$((total_stall + ${stall_kills:-0}))
    total_disk_full=$((total_disk_full + disk_full))
    if ! tally_run "$work/run.err" "$work/audit.err" && [[ ${CHAOS_KEEP_FAILED:-0} == 1 ]]; then
        echo "    state kept in $work" >&2
        work=""
    fi
    [[ -n $work ]] && rm -rf "$work"
    work=""
done

verdict=$(verdict)
echo "chaos: runs=$done_runs kills=$total_kills (store-write=$total_store_write" \
     "supervisor=$total_supervisor pool=$total_pool stall=$total_stall disk-full=$total_disk_full) lost=$total_lost" \
     "reruns_of_completed_batches=$total_reruns duplicate_rows=$total_dupes" \
     "violations=$total_violations -> $verdict"
[[ $verdict == PASS ]]
