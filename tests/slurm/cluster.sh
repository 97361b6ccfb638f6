#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged, slurmctld, slurmd on localhost), for qpexp's
# cluster tests (tests/test_slurm.py) and for trying `hydra/launcher=slurm` on a laptop.
#
#   tests/slurm/cluster.sh up [DIR]     install slurm-wlm and munge when missing (Debian/Ubuntu, as
#                                       root), write DIR/slurm.conf for this host, start the three
#                                       daemons, wait until the node is idle; prints `export SLURM_CONF=...`
#   tests/slurm/cluster.sh down [DIR]   stop the three daemons (by their pid files in DIR)
#   tests/slurm/cluster.sh env [DIR]    print `export SLURM_CONF=DIR/slurm.conf`
#
# DIR (default $QPEXP_SLURM_DIR, else /tmp/qpexp-slurm) holds the config, the munge key and socket, the
# controller's state, the daemon's spool, the logs and the pid files. Ports: $QPEXP_SLURM_PORT (the
# controller's, default 16817) and the next one (the daemon's). Clients (sbatch, squeue, srun, qpexp's
# sweeps) find the cluster through $SLURM_CONF. Job completions are written to DIR/jobcomp.txt
# (sacct needs slurmdbd and a database, which this one-node cluster does without). A requeued job
# waits cred_expire + 1 s before it may start again: SLURM's default is 120 s, this cluster's
# $QPEXP_SLURM_CRED_EXPIRE (default 10).
# Exit status 3: slurm-wlm/munge are missing and cannot be installed here (the tests skip then).
set -euo pipefail
cmd="${1:-up}"
dir="$(realpath -m "${2:-${QPEXP_SLURM_DIR:-/tmp/qpexp-slurm}}")"
port="${QPEXP_SLURM_PORT:-16817}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

die() { echo "cluster.sh: $*" >&2; exit 1; }
cannot_install() { echo "cluster.sh: $*" >&2; exit 3; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || cannot_install "slurm-wlm and munge are not installed, and installing them needs root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || cannot_install "slurm-wlm and munge are not installed, and this system has no apt-get"
  echo "cluster.sh: installing slurm-wlm and munge" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2 \
    || cannot_install "apt-get install slurm-wlm munge failed"
}

write_conf() {
  local node cpus mem user
  node="$(hostname -s)"
  cpus="$(nproc)"
  # the node's memory as slurmd measures it, less 10% (a RealMemory above the measure drains the node)
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
  mem=$(( ${mem:-2048} * 9 / 10 ))
  user="$(id -un)"
  mkdir -p "$dir"/{state,spool,log,munge}
  cat > "$conf" <<CONF
# written by qpexp's tests/slurm/cluster.sh for $node
ClusterName=qpexp
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${QPEXP_SLURM_CRED_EXPIRE:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=600
DefMemPerCPU=1000
KillWait=5
SlurmdTimeout=30
MessageTimeout=20
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  local key="$dir/munge/munge.key"
  [ -s "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; }
  chmod 700 "$dir/munge"
  chmod 400 "$key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
}

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  install
  running "$dir/slurmctld.pid" && { echo "export SLURM_CONF=$conf"; return; }
  write_conf
  rm -f "$dir/jobcomp.txt"
  running "$dir/munge/munged.pid" || start_munge
  slurmctld -c -f "$conf"   # -c: a clean start (no jobs from an earlier cluster in DIR)
  slurmd -f "$conf"
  local t=0 state=""
  while [ $t -lt 120 ]; do
    state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
    [ "$state" = idle ] && { echo "export SLURM_CONF=$conf"; return; }
    sleep 1; t=$((t + 1))
  done
  tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  die "the node is not idle after 120 s (state: ${state:-none}); logs in $dir/log"
}

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 10 s
  local f="$1" pid i
  [ -s "$f" ] || return 0
  pid="$(cat "$f")"
  kill "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for i in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  scancel --quiet --user="$(id -un)" 2>/dev/null || true
  stop_pid "$dir/slurmd.pid"
  stop_pid "$dir/slurmctld.pid"
  stop_pid "$dir/munge/munged.pid"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) die "usage: cluster.sh up|down|env [DIR]" ;;
esac
