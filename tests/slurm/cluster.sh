#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged, mariadbd, slurmdbd, slurmctld, slurmd on
# localhost), for qpexp's cluster tests (tests/test_slurm.py) and for trying `hydra/launcher=slurm`
# on a laptop.
#
#   tests/slurm/cluster.sh up [DIR]     install slurm-wlm, munge, slurmdbd and mariadb-server when
#                                       missing (Debian/Ubuntu, as root), write DIR/slurm.conf and
#                                       DIR/slurmdbd.conf for this host, start the five daemons, wait
#                                       until the node is idle; prints `export SLURM_CONF=...`
#   tests/slurm/cluster.sh down [DIR]   stop the five daemons (by their pid files in DIR)
#   tests/slurm/cluster.sh env [DIR]    print `export SLURM_CONF=DIR/slurm.conf`
#
# DIR (default $QPEXP_SLURM_DIR, else /tmp/qpexp-slurm) holds the configs, the munge key and socket,
# the database, the controller's state, the daemon's spool, the logs and the pid files: a cluster per
# DIR, so clusters in different folders do not share anything but the host.
# Ports: four in a row, the controller's, the daemon's, slurmdbd's and the database's, from
# $QPEXP_SLURM_PORT; unset, the first block of four free ports from 16817 on (checked, under a lock,
# against the ports this host listens on: two clusters started at once get different blocks).
# Clients (sbatch, squeue, sacct, srun, qpexp's sweeps) find the cluster through $SLURM_CONF.
#
# Accounting: submitit (hydra/launcher=slurm) reads job states with `sacct`; a job that ends without
# a result (a lost node, scancel, out of memory) is seen as ended only through it. SLURM 22.05's
# sacct answers only from slurmdbd, which stores into MySQL/MariaDB: this cluster runs both, the
# database as a throwaway MariaDB server in DIR/mysql (TCP on 127.0.0.1 only, without grant tables:
# any local user may use it; no data but this cluster's job records). Job completions are also
# written to DIR/jobcomp.txt (one line per run that ended, a requeued run included).
# A requeued job waits cred_expire + 1 s before it may start again: SLURM's default is 120 s, this
# cluster's $QPEXP_SLURM_CRED_EXPIRE (default 10).
# Exit status 3: the packages are missing and cannot be installed here (the tests skip then).
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"   # the daemons live there; a user's PATH may lack them
cmd="${1:-up}"
dir="$(realpath -m "${2:-${QPEXP_SLURM_DIR:-/tmp/qpexp-slurm}}")"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
PACKAGES="slurm-wlm munge slurmdbd mariadb-server"

die() { echo "cluster.sh: $*" >&2; exit 1; }
cannot_install() { echo "cluster.sh: $*" >&2; exit 3; }

install() {
  local c missing=""
  for c in slurmctld slurmd munged slurmdbd mariadbd; do command -v "$c" >/dev/null || missing="$missing $c"; done
  [ -z "$missing" ] && return
  [ "$(id -u)" = 0 ] || cannot_install "missing:$missing; installing them needs root (apt-get install $PACKAGES)"
  command -v apt-get >/dev/null || cannot_install "missing:$missing, and this system has no apt-get ($PACKAGES)"
  echo "cluster.sh: installing $PACKAGES" >&2
  # policy-rc.d, where a container has one, keeps the packages' own services from starting
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACKAGES >&2 \
    || cannot_install "apt-get install $PACKAGES failed"
}

listening() {  # listening PORT: a TCP socket on this host listens on PORT
  local hex
  hex=":$(printf '%04X' "$1")"
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null \
    | awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }'
}

pick_ports() {  # sets $port: $QPEXP_SLURM_PORT, else the first free block of four from 16817
  port="${QPEXP_SLURM_PORT:-}"
  [ -n "$port" ] && return
  port=16817
  while listening "$port" || listening $((port + 1)) || listening $((port + 2)) || listening $((port + 3)); do
    port=$((port + 4))
    [ "$port" -lt 30000 ] || die "no four free ports in a row from 16817 to 30000"
  done
}

write_conf() {
  local node cpus mem user
  node="$(hostname -s)"
  cpus="$(nproc)"
  # the node's memory as slurmd measures it, less 10% (a RealMemory above the measure drains the node)
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
  mem=$(( ${mem:-2048} * 9 / 10 ))
  user="$(id -un)"
  mkdir -p "$dir"/{state,spool,log,munge,mysql}
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
ReturnToService=1
# job states for sacct (submitit reads them): slurmdbd, no resource usage gathered
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((port + 2))
# the munge socket for slurmdbd connections (else the host's default one, /run/munge)
AccountingStoragePass=$dir/munge/munge.socket
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
  # slurmdbd reads slurmdbd.conf beside $SLURM_CONF; it must belong to SlurmUser, mode 600
  ( umask 077; cat > "$dir/slurmdbd.conf" <<CONF
# written by qpexp's tests/slurm/cluster.sh for $node
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((port + 2))
SlurmUser=$user
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=$user
StorageLoc=slurm_acct_db
CONF
  )
}

start_munge() {
  local key="$dir/munge/munge.key"
  [ -s "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; }
  chmod 700 "$dir/munge"
  chmod 400 "$key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" 9>&-
}

start_db() {  # a throwaway MariaDB for slurmdbd: no system tables, no grants, TCP on 127.0.0.1 only
  local t
  setsid mariadbd --no-defaults --datadir="$dir/mysql" --user="$(id -un)" --bind-address=127.0.0.1 \
    --port=$((port + 3)) --socket="$dir/mysqld.sock" --pid-file="$dir/mysqld.pid" \
    --log-error="$dir/log/mysqld.log" --skip-grant-tables --skip-log-bin --performance-schema=OFF \
    --innodb-buffer-pool-size=16M --innodb-log-file-size=4M </dev/null >>"$dir/log/mysqld.log" 2>&1 9>&- &
  for t in $(seq 120); do
    mariadb-admin --no-defaults -h127.0.0.1 -P$((port + 3)) -uroot ping >/dev/null 2>&1 && return
    sleep 0.5
  done
  tail -20 "$dir/log/mysqld.log" >&2 || true
  die "the database did not start in 60 s; log in $dir/log/mysqld.log"
}

start_dbd() {  # slurmdbd, then this cluster registered in it (before the controller connects)
  local t
  slurmdbd 9>&-
  for t in $(seq 30); do
    sacctmgr -i -n add cluster qpexp >/dev/null 2>&1 && return
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx qpexp && return
    sleep 0.5
  done
  tail -20 "$dir/log/slurmdbd.log" >&2 || true
  die "slurmdbd did not answer in 30 tries; log in $dir/log/slurmdbd.log"
}

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {  # the five daemons, the ports picked under a lock held until they listen (not by them: 9>&-)
  exec 9>"${TMPDIR:-/tmp}/qpexp-slurm-ports.lock"
  flock 9
  pick_ports
  write_conf
  rm -f "$dir/jobcomp.txt"
  running "$dir/munge/munged.pid" || start_munge
  running "$dir/mysqld.pid" || start_db
  running "$dir/slurmdbd.pid" || start_dbd
  slurmctld -c -f "$conf" 9>&-   # -c: a clean start (no jobs from an earlier cluster in DIR)
  slurmd -f "$conf" 9>&-
  exec 9>&-
}

up() {
  install
  running "$dir/slurmctld.pid" && { echo "export SLURM_CONF=$conf"; return; }
  start
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
  stop_pid "$dir/slurmdbd.pid"
  stop_pid "$dir/mysqld.pid"
  stop_pid "$dir/munge/munged.pid"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) die "usage: cluster.sh up|down|env [DIR]" ;;
esac
