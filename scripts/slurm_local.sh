#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests and for trying midtrain's cluster paths on a laptop.
#
#   scripts/slurm_local.sh start    # writes the config, starts munged + slurmctld + slurmd, waits for an idle node
#   scripts/slurm_local.sh status   # daemons and `sinfo`
#   scripts/slurm_local.sh stop     # cancels this cluster's jobs, stops the daemons by their recorded pids
#
# Everything lives under $MIDTRAIN_SLURM_DIR (default /tmp/midtrain-slurm): slurm.conf, the munge key and socket, state,
# spool, pid files and logs (log/). Clients find the cluster through SLURM_CONF, which `start` prints:
#   eval "$(scripts/slurm_local.sh start | grep '^export ')"
#
# Needs Debian's packages (the script installs nothing):  apt-get install -y slurm-wlm munge
#
# Built for containers and CI machines: no cgroups (proctrack/linuxproc, task/none), no accounting database, our own
# munge socket and non-default ports so a system Slurm or munge on the same machine is left alone. The daemons run in
# the foreground (-D / -F) in their own sessions, so the pids recorded are the daemons themselves and `stop` signals
# exactly those, never processes found by name.
set -euo pipefail

DIR=${MIDTRAIN_SLURM_DIR:-/tmp/midtrain-slurm}
CTLD_PORT=${MIDTRAIN_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${MIDTRAIN_SLURM_SLURMD_PORT:-16818}
START_TIMEOUT=${MIDTRAIN_SLURM_START_TIMEOUT:-60}
INSTALL="apt-get install -y slurm-wlm munge"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
DAEMONS=(munged slurmctld slurmd)

die() { echo "slurm_local.sh: error: $*" >&2; exit 1; }

need() {
  local bin
  for bin in "$@"; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] ||
      die "'$bin' not found; install Slurm and munge first: $INSTALL"
  done
}

bin() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

pid_of() { [[ -s "$DIR/$1.pid" ]] && cat "$DIR/$1.pid"; }

alive() {  # alive NAME: the recorded pid exists and is still that daemon (a recycled pid is not ours)
  local pid comm
  pid=$(pid_of "$1") || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  # Just after `start_daemon`, the pid may still be the shell or setsid about to exec the daemon.
  [[ "$comm" == "$1"* || "$comm" == setsid || "$comm" == bash ]]
}

node_state() { sinfo -h -N -o "%T" 2>/dev/null | head -n 1; }

write_config() {
  local host cpus mem
  host=$(hostname -s)
  # The node as slurmd sees it; RealMemory a little below the measured total so that the node is never drained for
  # "Low RealMemory" when the kernel reports a few MB less later.
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 755 "$DIR/munge"  # munged: the socket directory must be searchable by all
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node test cluster. Do not edit; \`start\` rewrites it.
ClusterName=midtrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s; 5 is the minimum).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid.internal
SlurmdPidFile=$DIR/spool/slurmd.pid.internal
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# Containers: no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# CPUs are the consumable resource; memory is declared (requests above it are refused) but not reserved.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# The main scheduling pass every 2 s (default 60 s): a requeued job becomes eligible by time, and only this pass
# notices; submissions and job ends trigger a pass of their own.
SchedulerParameters=sched_interval=2
# Requeue: \`scontrol requeue\`, \`sbatch --requeue\` and preemption put a job back in the queue.
JobRequeue=1
ReturnToService=2
# Short timeouts: tests wait on these. KillWait is the grace between SIGTERM and SIGKILL (a checkpoint fits in it).
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=30
MinJobAge=600
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {  # start_daemon NAME ARGS...: in its own session, foreground, pid recorded
  local name=$1; shift
  setsid "$(bin "$name")" "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

cmd_start() {
  need munged slurmctld slurmd sinfo scontrol squeue sbatch
  local running=0 name
  for name in "${DAEMONS[@]}"; do alive "$name" && running=$((running + 1)); done
  if ((running == ${#DAEMONS[@]})); then
    echo "slurm_local.sh: already running ($DIR); node: $(node_state || echo '?')"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  if ((running > 0)); then
    echo "slurm_local.sh: a partial cluster is running in $DIR; stopping it first" >&2
    cmd_stop
  fi
  write_config
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"
  # --force: munged refuses a socket directory under a world-writable /tmp without it.
  start_daemon munged -F --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  local deadline=$((SECONDS + 10))
  until [[ -S "$DIR/munge/munge.socket" ]]; do
    alive munged || die "munged exited; see $DIR/log/munged.log and $DIR/log/munged.out"
    ((SECONDS < deadline)) || die "munged did not create its socket in 10 s; see $DIR/log/munged.log"
    sleep 0.2
  done
  # -c: a fresh controller state (no jobs left from an earlier cluster in this directory).
  start_daemon slurmctld -D -c -f "$CONF"
  start_daemon slurmd -D -f "$CONF" -N "$(hostname -s)"
  deadline=$((SECONDS + START_TIMEOUT))
  local state=""
  while :; do
    state=$(node_state || true)
    [[ "$state" == idle* ]] && break
    for name in slurmctld slurmd; do
      alive "$name" || { cmd_stop >/dev/null 2>&1 || true; die "$name exited during start; see $DIR/log/$name.log and $DIR/log/$name.out"; }
    done
    if ((SECONDS >= deadline)); then
      cmd_stop >/dev/null 2>&1 || true
      die "the node is not idle after ${START_TIMEOUT} s (state: ${state:-none}); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
    fi
    sleep 0.5
  done
  echo "slurm_local.sh: cluster up ($DIR); node $(hostname -s): $state; partition debug"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  local name pid
  if alive slurmctld; then
    # Jobs first, so that no job step outlives its slurmd; bounded, then the daemons go regardless.
    local jobs
    jobs=$(squeue -h -o "%A" 2>/dev/null | sort -u || true)
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local deadline=$((SECONDS + 20))
      while [[ -n "$(squeue -h -o %A 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
  fi
  for name in slurmd slurmctld munged; do  # reverse start order
    if alive "$name"; then
      pid=$(pid_of "$name")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$name" || break; sleep 0.2; done
      alive "$name" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
  done
  # Keep slurm.conf, the munge key and log/ (for a look after a failed CI run); the rest is per-cluster state.
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/munge/munge.socket"* "$DIR/munge/munged.pid"
  echo "slurm_local.sh: stopped ($DIR)"
}

cmd_status() {
  local name rc=0
  for name in "${DAEMONS[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; rc=3; fi
  done
  if ((rc == 0)); then
    sinfo
    echo "export SLURM_CONF=$CONF"
  fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (cluster directory: \$MIDTRAIN_SLURM_DIR, default /tmp/midtrain-slurm)" >&2
     exit 2 ;;
esac
