#!/usr/bin/env bash
# An MQAR sweep on a machine lent for a limited time, driven by commands of at most a few minutes each.
#
#   bash benchmarks/mqar_gpu_session.sh start OUT [sweep flags and overrides...]   # start the sweep detached
#   bash benchmarks/mqar_gpu_session.sh start OUT [grid A...] --then [grid B...]   # sweeps one after another
#   bash benchmarks/mqar_gpu_session.sh wait OUT SECONDS PACK [--checkpoints] [--every N]   # wait, pack results
#   bash benchmarks/mqar_gpu_session.sh go OUT SECONDS PACK [--checkpoints] [--every N] [--from DIR] -- [sweep args...]
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED DIR  # here, after a call: what came back into DIR, for --from
#   bash benchmarks/mqar_gpu_session.sh machine FILE     # what ran: the GPUs, driver, torch and triton, the date
#
# `start` runs `python -m pretrain.mqar.sweep --out OUT ...` in its own process session (setsid), so it outlives
# the command that started it; its output goes to OUT/sweep.log. `--then` separates sweeps (each with its own grid
# flags and overrides) that run one after another into OUT, in the order given: the way to say which settings a
# short lease spends its time on first. Every result JSON under benchmarks/results/mqar/seed_results/ that OUT lacks
# is copied into OUT first (a sweep skips the settings of its grid whose result exists and was made with the same
# config; results outside its grid are left alone, and are packed with the rest). `wait` sleeps until the sweep ends
# or SECONDS pass, then packs every result, every log and the sweep's own log into the archive PACK, written to a temporary name and renamed, so
# an archive is never half-written. With --checkpoints, each unfinished run's per-epoch checkpoint (OUT/<setting>.ckpt,
# a few MB at d_model 64) is also copied beside PACK, one file each, so that a run cut by the machine's lease resumes
# on the next machine: put the files back into OUT (e.g. pass OUT in the device tool's `carry`) and `start` again.
# The lent machine returns at most 8 files per call, each of up to about 16 MiB (so at most 3 runs of d_model 128
# at seq 2048 cut at once, with two archives): a larger checkpoint goes as parts of
# MQAR_CKPT_PART_BYTES (15 MiB) named <name>.ckpt.part<i>of<n>, and `start` joins a complete set back into
# <name>.ckpt (an incomplete set is reported and left alone; the run then starts afresh). With --every N, `wait`
# packs every N seconds until the sweep ends or SECONDS pass, refreshing the archive and the checkpoint copies and
# removing the copies it made of runs that have finished since: a command the lease cuts at any moment still
# returns every result so far and the latest checkpoint of every run still going.
#
# `go` is the one command to repeat while a lease lasts: if a sweep an earlier call started into OUT still runs on
# this machine it waits for it, like `wait`; otherwise (a fresh machine, the last one having been taken back) it first
# copies the results, logs and checkpoints of DIR that OUT lacks into OUT, starts the sweep given after `--`, and
# waits. Carry DIR (never OUT: carrying OUT in would replace it under a running sweep) and refresh it here after every
# call with `collect FETCHED DIR`: it unpacks each archive the call brought back into DIR, copies the checkpoints
# beside them, and drops the checkpoints of runs whose result DIR now holds. Once the sweep has finished, `wait` and
# `go` exit with its exit code (1 if it ended without one: killed). `wait` on a machine where no sweep was started into
# OUT says so and exits 4.
set -euo pipefail
self="$(realpath "$0")"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
action="${1:?usage: $0 start OUT [sweep args...] | wait OUT SECONDS PACK | go OUT SECONDS PACK ... -- [sweep args...] | collect FETCHED DIR | machine FILE}"
out="${2:?missing OUT}"
# The sweep's pid is also kept outside OUT: a device tool that carries OUT in replaces the folder, pid file included,
# while the sweep an earlier call started on the same (warm) machine still runs and writes into it
running="${TMPDIR:-/tmp}/mqar_gpu_session.$(realpath -m "$out" | md5sum | cut -c1-16).pid"

alive() {  # a process that exists and is not a zombie left unreaped
  local state
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  [[ -n "$state" && "$state" != Z ]]
}

# Pack every result and log (and the sweep's log) into the archive $1, written to a temporary name and renamed; with
# $2 set, copy each unfinished run's checkpoint beside it (in parts over MQAR_CKPT_PART_BYTES) and remove the copies
# of checkpoints whose runs have finished, so the folder always holds the latest state of every run still going.
declare -A copied=()  # checkpoint names pack_results has copied beside PACK in this command
pack_results() {
  local pack="$1" checkpoints="$2" dest part_bytes ckpt name size count i part
  (cd "$out" && find . -maxdepth 1 -type f \( -name '*.json' -o -name '*.log' \) -print0 |
    tar czf "$pack.tmp" --null -T -)
  mv "$pack.tmp" "$pack"
  echo "packed $(tar tzf "$pack" | wc -l) files into $pack"
  [[ -n "$checkpoints" ]] || return 0
  # a run replaces its checkpoint by rename, so a copy reads one whole version
  part_bytes="${MQAR_CKPT_PART_BYTES:-15728640}"
  dest="$(dirname "$pack")"
  for ckpt in "$out"/*.ckpt; do
    [[ -f "$ckpt" ]] || continue
    name="$(basename "$ckpt")"
    # a run that ends meanwhile removes its checkpoint: skip it, not the ones after it
    cp "$ckpt" "$dest/.$name.tmp" 2>/dev/null || { echo "checkpoint $name gone (its run finished)"; continue; }
    copied[$name]=1
    size="$(stat -c %s "$dest/.$name.tmp")"
    if ((size <= part_bytes)); then
      mv "$dest/.$name.tmp" "$dest/$name"
      rm -f "$dest/$name".part*of*
      echo "checkpoint $name copied beside $pack"
      continue
    fi
    count=$(((size + part_bytes - 1) / part_bytes))
    split -b "$part_bytes" -d -a 3 "$dest/.$name.tmp" "$dest/.$name.split."
    i=1
    for part in "$dest/.$name.split."*; do
      mv "$part" "$dest/$name.part${i}of$count"
      i=$((i + 1))
    done
    rm -f "$dest/.$name.tmp" "$dest/$name"
    for part in "$dest/$name".part*of*; do  # parts of an earlier copy cut in another number of parts
      [[ "$part" == *"of$count" ]] || rm -f "$part"
    done
    echo "checkpoint $name copied beside $pack in $count parts"
  done
  # the copies this command made earlier of runs that have finished since (nothing else beside PACK is touched)
  for name in "${!copied[@]}"; do
    [[ -f "$out/$name" ]] && continue
    rm -f "$dest/$name" "$dest/$name".part*of*
    unset "copied[$name]"
    echo "removed the copy of checkpoint $name (its run finished)"
  done
}

# The pid of the sweep an earlier call started into OUT on this machine, or nothing (a fresh machine). The record
# outside OUT comes first: carrying OUT in replaces OUT/sweep.pid, and a pid file carried from another machine names
# an unrelated process.
sweep_pid() {
  cat "$running" 2>/dev/null || cat "$out/sweep.pid" 2>/dev/null || true
}

# Start the sweeps "$@" (--then-separated) detached into OUT; exit 3 if one an earlier call started still runs.
start_sweep() {
  local first ckpt count parts i seed
  if [[ -f "$running" ]] && alive "$(cat "$running")"; then
    echo "a sweep into $out from an earlier call is still running (pid $(cat "$running")): 'wait' for it, or stop" \
      "it first; two would train the same settings into the same files" >&2
    exit 3
  fi
  mkdir -p "$out"
  for first in "$out"/*.ckpt.part1of*; do  # checkpoints brought back in parts
    [[ -f "$first" ]] || continue
    ckpt="${first%.part1of*}"
    count="${first##*.part1of}"
    parts=()
    for ((i = 1; i <= count; i++)); do parts+=("$ckpt.part${i}of$count"); done
    if ls "${parts[@]}" >/dev/null 2>&1; then
      cat "${parts[@]}" >"$ckpt.tmp" && mv "$ckpt.tmp" "$ckpt" && rm -f "${parts[@]}"
      echo "joined $count parts into $ckpt"
    else
      echo "incomplete parts of $ckpt (want $count): not joined" >&2
    fi
  done
  for seed in benchmarks/results/mqar/seed_results/*.json; do  # never over a result already in OUT
    [[ -f "$seed" && ! -e "$out/$(basename "$seed")" ]] && cp "$seed" "$out"/
  done
  rm -f "$out/sweep.exit"
  export PYTHONUNBUFFERED=1
  setsid nohup bash "$self" sweeps "$out" "$@" >"$out/sweep.log" 2>&1 </dev/null &
  echo "$!" >"$out/sweep.pid"
  echo "$!" >"$running"
  echo "sweep started (pid $(cat "$out/sweep.pid")); log: $out/sweep.log"
}

# Wait up to SECONDS for the sweep PID, packing into PACK (every $every seconds if set, and at the end).
wait_sweep() {
  local pid="$1" seconds="$2" pack="$3" end until_pack stop finished="" code
  end=$((SECONDS + seconds))
  while :; do
    until_pack=$((end - SECONDS))
    [[ -n "$every" ]] && ((every < until_pack)) && until_pack=$every
    stop=$((SECONDS + until_pack))
    while alive "$pid" && ((SECONDS < stop)); do
      sleep 1
    done
    alive "$pid" && finished="" || finished=1
    pack_results "$pack" "$checkpoints"
    [[ -n "$finished" ]] && break
    ((SECONDS >= end)) && { echo "sweep still running after ${seconds}s"; break; }
  done
  tail -n 40 "$out/sweep.log"
  [[ -n "$finished" ]] || return 0
  # the sweep's own exit code becomes this command's, so a failed setting shows in the call's status
  if [[ -f "$out/sweep.exit" ]]; then
    code="$(cat "$out/sweep.exit")"
    echo "sweep finished, exit code $code"
    return "$code"
  fi
  echo "sweep finished without an exit code (killed?)"
  return 1
}

# The options of `wait` and `go` (--from and `--` for `go` only); sets checkpoints, every, from and rest (what follows
# `--`: the sweep's arguments).
checkpoints="" every="" from=""
rest=()
parse_wait_options() {
  local allow_from=""
  [[ "$action" == go ]] && allow_from=1
  while (($#)); do
    case "$1" in
      --checkpoints) checkpoints=1 ;;
      --every)
        every="${2:-}"
        [[ "$every" =~ ^[1-9][0-9]*$ ]] || { echo "--every needs a whole number of seconds > 0" >&2; exit 2; }
        shift ;;
      --from)
        [[ -n "$allow_from" ]] || { echo "unknown option '$1'" >&2; exit 2; }
        from="${2:?--from needs a folder}"
        shift ;;
      --)
        [[ -n "$allow_from" ]] || { echo "unknown option '$1'" >&2; exit 2; }
        shift
        rest=("$@")
        return ;;
      *) echo "unknown option '$1'" >&2; exit 2 ;;
    esac
    shift
  done
}

case "$action" in
  machine)  # the record a results README quotes: GPU name, driver and memory, torch and triton, the date (UTC)
    {
      if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
      else
        echo "no nvidia-smi"
      fi
      "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 || true
      date -u
    } >"$out"
    ;;
  start)
    shift 2
    start_sweep "$@"
    ;;
  sweeps)  # what `start` runs detached: each --then-separated sweep in turn; the exit code is the last failure's
    shift 2
    status=0
    group=()
    for arg in "$@" --then; do
      if [[ "$arg" != --then ]]; then
        group+=("$arg")
        continue
      fi
      echo "== sweep ${group[*]} ($(date -u +%T))"
      "$PYTHON" -m pretrain.mqar.sweep --out "$out" "${group[@]}" || status=$?
      group=()
    done
    echo "$status" >"$out/sweep.exit.tmp" && mv "$out/sweep.exit.tmp" "$out/sweep.exit"
    exit "$status"
    ;;
  wait | go)
    seconds="${3:?missing SECONDS}"
    pack="${4:?missing PACK}"
    shift 4
    parse_wait_options "$@"
    pid="$(sweep_pid)"
    if [[ "$action" == wait && -z "$pid" ]]; then
      echo "no sweep was started into $out on this machine (a fresh machine, the last one taken back?): 'start'" \
        "it again, or use 'go', with the latest results and checkpoints" >&2
      exit 4
    elif [[ "$action" == go && -n "$pid" ]] && alive "$pid"; then
      echo "the sweep an earlier call started is still running (pid $pid): waiting for it"
    elif [[ "$action" == go ]]; then
      if [[ -n "$from" ]]; then
        [[ -d "$from" ]] || { echo "--from: no folder '$from'" >&2; exit 2; }
        [[ "$(realpath "$from")" != "$(realpath -m "$out")" ]] || { echo "--from must not be OUT itself" >&2; exit 2; }
        mkdir -p "$out"
        for file in "$from"/*.json "$from"/*.log "$from"/*.ckpt "$from"/*.ckpt.part*of*; do
          [[ -f "$file" && "$(basename "$file")" != sweep.log ]] || continue
          [[ -e "$out/$(basename "$file")" ]] && continue  # what OUT holds is at least as new
          cp "$file" "$out"/
          echo "brought $(basename "$file") from $from"
        done
      fi
      start_sweep "${rest[@]}"
      pid="$(sweep_pid)"
    fi
    wait_sweep "$pid" "$seconds" "$pack"
    ;;
  collect)  # here, after a call: FETCHED is the call's files folder, DIR the folder `go --from` carries
    dir="${3:?missing DIR}"
    [[ -d "$out" ]] || { echo "collect: no folder '$out'" >&2; exit 2; }
    mkdir -p "$dir"
    for archive in "$out"/*.tgz; do
      [[ -f "$archive" ]] || continue
      count="$(tar xzvf "$archive" -C "$dir" --exclude sweep.log | wc -l)"  # a broken archive stops here (pipefail)
      echo "unpacked $count files of $(basename "$archive") into $dir"
    done
    fetched=("$out"/*.ckpt "$out"/*.ckpt.part*of*)
    for file in "${fetched[@]}"; do  # an older copy goes first, whole or in parts, whatever form the new one has
      [[ -f "$file" ]] || continue
      name="$(basename "$file")"
      rm -f "$dir/${name%%.ckpt*}.ckpt" "$dir/${name%%.ckpt*}.ckpt".part*of*
    done
    for file in "${fetched[@]}"; do
      [[ -f "$file" ]] || continue
      cp "$file" "$dir"/
      chmod u+w "$dir/$(basename "$file")"
      echo "checkpoint $(basename "$file") copied into $dir"
    done
    for ckpt in "$dir"/*.ckpt "$dir"/*.ckpt.part*of*; do  # a run whose result has come back needs no checkpoint
      [[ -f "$ckpt" ]] || continue
      result="${ckpt%%.ckpt*}"
      [[ -f "$result" ]] || continue
      rm -f "$ckpt"
      echo "dropped $(basename "$ckpt"): its run finished"
    done
    ;;
  *)
    echo "unknown action '$action' (start | wait | go | collect | machine)" >&2
    exit 2
    ;;
esac
