#!/usr/bin/env bash
# An MQAR sweep on a machine lent for a limited time, driven by commands of at most a few minutes each.
#
#   bash benchmarks/mqar_gpu_session.sh start OUT [sweep flags and overrides...]   # start the sweep detached
#   bash benchmarks/mqar_gpu_session.sh start OUT [grid A...] --then [grid B...]   # sweeps one after another
#   bash benchmarks/mqar_gpu_session.sh wait OUT SECONDS PACK [--checkpoints] [--every N]   # wait, pack results
#   bash benchmarks/mqar_gpu_session.sh machine FILE     # what ran: the GPUs, driver, torch and triton, the date
#
# `start` runs `python -m pretrain.mqar.sweep --out OUT ...` in its own process session (setsid), so it outlives
# the command that started it; its output goes to OUT/sweep.log. `--then` separates sweeps (each with its own grid
# flags and overrides) that run one after another into OUT, in the order given: the way to say which settings a
# short lease spends its time on first. Every result JSON under benchmarks/results/mqar/seed_results/ that OUT lacks
# is copied into OUT first (a sweep skips the settings of its grid whose result exists and was made with the same
# config; results outside its grid are left alone, and are packed with the rest). `wait` sleeps until the sweep ends or SECONDS pass, then packs
# every result, every log and the sweep's own log into the archive PACK, written to a temporary name and renamed, so
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
set -euo pipefail
self="$(realpath "$0")"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
action="${1:?usage: $0 start OUT [sweep args...] | wait OUT SECONDS PACK | machine FILE}"
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
    export PYTHONUNBUFFERED=1
    setsid nohup bash "$self" sweeps "$out" "$@" >"$out/sweep.log" 2>&1 </dev/null &
    echo "$!" >"$out/sweep.pid"
    echo "$!" >"$running"
    echo "sweep started (pid $(cat "$out/sweep.pid")); log: $out/sweep.log"
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
    exit "$status"
    ;;
  wait)
    seconds="${3:?missing SECONDS}"
    pack="${4:?missing PACK}"
    shift 4
    checkpoints="" every=""
    while (($#)); do
      case "$1" in
        --checkpoints) checkpoints=1 ;;
        --every)
          every="${2:-}"
          [[ "$every" =~ ^[1-9][0-9]*$ ]] || { echo "--every needs a whole number of seconds > 0" >&2; exit 2; }
          shift ;;
        *) echo "unknown option '$1'" >&2; exit 2 ;;
      esac
      shift
    done
    pid="$(cat "$out/sweep.pid" 2>/dev/null || cat "$running")"
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
      [[ -n "$finished" ]] && { echo "sweep finished"; break; }
      ((SECONDS >= end)) && { echo "sweep still running after ${seconds}s"; break; }
    done
    tail -n 40 "$out/sweep.log"
    ;;
  *)
    echo "unknown action '$action' (start | wait | machine)" >&2
    exit 2
    ;;
esac
