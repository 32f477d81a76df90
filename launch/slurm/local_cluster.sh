#!/usr/bin/env bash
# A local Slurm cluster on this one machine, for the Slurm tests and for trying the sbatch scripts:
#   launch/slurm/local_cluster.sh up       # start (or keep) munged, slurmctld and one slurmd per node
#   launch/slurm/local_cluster.sh down     # cancel its jobs, stop its daemons, remove all but the daemons' logs
#   launch/slurm/local_cluster.sh status   # sinfo / squeue of it, exit 1 when it is not up
#   eval "$(launch/slurm/local_cluster.sh env)"   # point sbatch, srun, squeue, scontrol at it (SLURM_CONF)
#
# Needs root and Debian's packages `slurmd slurmctld slurm-client munge` (.ci/run installs them). Everything lives
# in REBASED_SLURM_DIR (default /tmp/rebased-slurm): its own munge key and munged socket, slurm.conf, state, logs
# and pid files, so a system Slurm or munge on the machine is neither used nor touched. `up` is idempotent: a
# running cluster with the same slurm.conf is kept, anything else of ours is stopped and started afresh.
#
# Two nodes, n1 and n2, are simulated on this host: two slurmd daemons, each on its own port, both reached through
# 127.0.0.1 (NodeAddr). Each node offers max(nproc, 2) CPUs (SlurmdParameters=config_overrides) so that a job of
# two tasks fits on one node of a one-core machine. Processes are tracked by their parent chain
# (proctrack/linuxproc) and not bound (task/none): no cgroups needed, so it runs in a container.
#
# Environment: REBASED_SLURM_DIR, REBASED_SLURM_PORT (slurmctld's port, default 6917; slurmd n1/n2 take the next
# two), REBASED_SLURM_NODES (1 or 2, default 2).
set -euo pipefail
DIR="${REBASED_SLURM_DIR:-/tmp/rebased-slurm}"
PORT="${REBASED_SLURM_PORT:-6917}"
NODES="${REBASED_SLURM_NODES:-2}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there; a user's PATH may not have it

die() { echo "local_cluster: $*" >&2; exit 1; }
node_names() { for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

write_conf() {  # to stdout: the slurm.conf for the current settings
  local host cpus i
  host=$(hostname -s)
  cpus=$(nproc); (( cpus < 2 )) && cpus=2
  cat <<EOF
# written by launch/slurm/local_cluster.sh
ClusterName=rebased-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire + 1 s (120 s by default): the old credential must be expired
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# the main scheduling pass every second (default 60 s): it starts a requeued job once its BeginTime has passed
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# finished jobs stay visible to scontrol for 10 minutes (tests read their exit codes there)
MinJobAge=600
KillWait=10
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=1000" \
      "State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop the daemon whose pid the file holds (ours: we wrote the file), waiting up to 10 s
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

is_up() {  # our daemons run with the slurm.conf we would write now, and every node answers
  [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$(write_conf)" ] || return 1
  alive "$DIR/munged.pid" && alive "$DIR/slurmctld.pid" || return 1
  local n; for n in $(node_names); do alive "$DIR/slurmd-$n.pid" || return 1; done
  node_states | grep -qvE '^(idle|mixed|allocated|completing)' && return 1
  [ "$(node_states | wc -l)" -eq "$NODES" ]
}

node_states() { sinfo -h -N -o '%T' 2>/dev/null | tr -d '*~#'; }

down() {
  if alive "$DIR/slurmctld.pid"; then
    scancel --full --signal=KILL --quiet "$(squeue -h -o %i 2>/dev/null | paste -sd, -)" 2>/dev/null || true
  fi
  local f
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do stop_pidfile "$f"; done
  [ -d "$DIR" ] && find "$DIR" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
  return 0
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users; CI runs as root)"
  local missing=() b
  for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: apt-get install slurmd slurmctld slurm-client munge"
  [[ "$NODES" =~ ^[12]$ ]] || die "REBASED_SLURM_NODES must be 1 or 2, got '$NODES'"
  if is_up; then echo "local Slurm cluster already up ($CONF)"; return 0; fi
  down
  mkdir -p "$DIR"/{munge,state,log} && chmod 700 "$DIR" "$DIR/munge"
  for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
  write_conf > "$CONF"
  head -c 1024 /dev/urandom > "$DIR/munge/munge.key" && chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start: $(tail -n 3 "$DIR/log/munged.log" 2>/dev/null)"
  slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 3 "$DIR/log/slurmctld.log" 2>/dev/null)"
  for n in $(node_names); do
    slurmd -f "$CONF" -N "$n" || die "slurmd $n did not start: $(tail -n 3 "$DIR/log/slurmd-$n.log" 2>/dev/null)"
  done
  for _ in $(seq 300); do
    if is_up; then
      echo "local Slurm cluster up: $(sinfo -h -o '%D nodes, %c CPUs each, partition %P') ($(sinfo -V))"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.1
  done
  die "nodes not ready after 30 s: $(sinfo -h -N -o '%N %T' 2>&1 | paste -sd' ' -); logs in $DIR/log"
}

case "${1:-}" in
  up) up ;;
  down) down; echo "local Slurm cluster down" ;;
  status) is_up || { echo "local Slurm cluster is not up" >&2; exit 1; }; sinfo -N; squeue ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
