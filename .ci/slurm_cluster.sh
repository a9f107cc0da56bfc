#!/usr/bin/env bash
# .ci/slurm_cluster.sh -- bring up a one-node Slurm cluster on the CI host (localhost) for the
# harness's submitit tests. Target: Debian 12 (Slurm 22.05), run as root, no systemd, no cgroups.
#
#   .ci/slurm_cluster.sh start    install missing packages, write configs, start
#                                 munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd,
#                                 register the cluster in accounting, wait for an idle node.
#                                 Safe to re-run: daemons that are up and answering are kept;
#                                 slurmctld/slurmd are restarted only when slurm.conf changed,
#                                 slurmdbd only when slurmdbd.conf changed.
#   .ci/slurm_cluster.sh stop     stop the daemons named in their pid files (kill by PID only).
#   .ci/slurm_cluster.sh status   daemon pids, sinfo, registered clusters.
#
# Accounting is always real (slurmdbd + MariaDB), so `sacct` reports true final job states.
# submitit relies on sacct to notice jobs that end without writing a result (scancel, timeout).
#
# Environment knobs (defaults in brackets):
#   SLURM_PARTITION [debug]     name of the single (default) partition
#   SLURM_TASK_PLUGIN [task/none]  task/none: a job sees every CPU of the host;
#                               task/affinity would pin a job to its allocated cores
#   SLURM_MIN_JOB_AGE [86400]   seconds slurmctld keeps finished jobs in memory (squeue/scontrol)
#   SLURM_KILL_WAIT [5]         seconds between SIGTERM and SIGKILL on cancel / time limit
#   SLURM_MEM_PCT [95]          share of the host RAM advertised as RealMemory
#   SLURM_REQUEUE_DELAY [30]    AuthInfo cred_expire: a requeued job stays PENDING (BeginTime)
#                               this many seconds + 1 (Slurm's default is 120); min 5
#   SLURM_SCHED_INTERVAL [5]    seconds between scheduler passes (sched_interval, bf_interval);
#                               Slurm's defaults are 60 / 30
#   SLURM_DB_PASS [harness_ci]  password of the MariaDB user 'slurm' (local socket only)
set -euo pipefail

PARTITION="${SLURM_PARTITION:-debug}"
TASK_PLUGIN="${SLURM_TASK_PLUGIN:-task/none}"
MIN_JOB_AGE="${SLURM_MIN_JOB_AGE:-86400}"
KILL_WAIT="${SLURM_KILL_WAIT:-5}"
MEM_PCT="${SLURM_MEM_PCT:-95}"
REQUEUE_DELAY="${SLURM_REQUEUE_DELAY:-30}"
SCHED_INTERVAL="${SLURM_SCHED_INTERVAL:-5}"
DB_PASS="${SLURM_DB_PASS:-harness_ci}"
CLUSTER=harnessci

ETC=/etc/slurm
SLURM_CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
RUNDIR=/run/slurm
LOGS=/var/log/slurm

PID_MUNGE=/run/munge/munged.pid
PID_MYSQL=/run/mysqld/mysqld.pid
PID_DBD=$RUNDIR/slurmdbd.pid
PID_CTLD=$RUNDIR/slurmctld.pid
PID_SLURMD=$RUNDIR/slurmd.pid

PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

say() { echo "[slurm_cluster $(date +%H:%M:%S)] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# daemon_name PIDFILE: the process name (/proc/PID/comm) expected behind one of our pid files
daemon_name() {
  case "$1" in
    "$PID_MYSQL") echo mariadbd ;;
    *) basename "$1" .pid ;;
  esac
}

# pid_alive FILE: true when FILE holds the pid of a live process with the expected name, so a
# stale pid file whose number was reused by some other process is never mistaken for ours
pid_alive() {
  local p
  [ -s "$1" ] && p="$(<"$1")" && [[ "$p" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$p" 2>/dev/null && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$(daemon_name "$1")" ]
}

# retry SECONDS CMD...: run CMD every 0.2 s until it succeeds or SECONDS pass
retry() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

# kill_pidfile FILE: SIGTERM the pid in FILE, wait up to 15 s, then SIGKILL; remove FILE
kill_pidfile() {
  local f=$1 p
  if pid_alive "$f"; then
    p="$(<"$f")"
    say "stopping pid $p ($f)"
    kill -TERM "$p" 2>/dev/null || true
    local i
    for i in $(seq 75); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then say "pid $p ignored SIGTERM; SIGKILL"; kill -KILL "$p" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

# replace_if_changed TMP DEST MODE: install TMP as DEST when different; returns 0 if changed
replace_if_changed() {
  local tmp=$1 dest=$2 mode=$3
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 1; fi
  say "writing $dest"
  install -m "$mode" "$tmp" "$dest"; rm -f "$tmp"; return 0
}

# ---------------------------------------------------------------------------------------------
ensure_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no recommends: keeps out e.g. the mailer and extra mariadb clients; policy-rc.d-less
  # install is fine here because there is no init system to start services anyway.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "generating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else head -c 1024 /dev/urandom >/etc/munge/munge.key; fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if pid_alive "$PID_MUNGE" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged up (pid $(<"$PID_MUNGE"))"; return 0
  fi
  rm -f "$PID_MUNGE"
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  retry 10 sh -c 'munge -n | unmunge' || die "munged not answering (/var/log/munge/munged.log)"
}

ensure_mariadb() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    say "initialising MariaDB data directory"
    mariadb-install-db --user=mysql >/dev/null
  fi
  if pid_alive "$PID_MYSQL" && mariadb-admin ping >/dev/null 2>&1; then
    say "mariadbd up (pid $(<"$PID_MYSQL"))"
  else
    rm -f "$PID_MYSQL"
    say "starting mariadbd"
    setsid -f /usr/sbin/mariadbd --user=mysql --pid-file="$PID_MYSQL" \
      >>"$LOGS/mariadb.log" 2>&1 </dev/null
    retry 60 mariadb-admin ping || die "mariadbd not answering ($LOGS/mariadb.log)"
  fi
  mariadb <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

ensure_slurmdbd() {
  local tmp; tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# generated by .ci/slurm_cluster.sh -- do not edit
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$PID_DBD
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
  if replace_if_changed "$tmp" "$DBD_CONF" 0600; then kill_pidfile "$PID_DBD"; fi
  if pid_alive "$PID_DBD"; then
    say "slurmdbd up (pid $(<"$PID_DBD"))"
  else
    rm -f "$PID_DBD"
    say "starting slurmdbd"
    slurmdbd
  fi
  retry 20 sacctmgr -n -i list cluster || die "slurmdbd not answering ($LOGS/slurmdbd.log)"
}

register_cluster() {
  # slurmctld also adds itself on first contact, but doing it here first makes sure that jobs
  # from the very first start are recorded and that sacct knows the cluster name.
  if sacctmgr -n -P list cluster format=Cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    return 0
  fi
  say "registering cluster '$CLUSTER' in accounting"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

write_slurm_conf() {
  local host hw mem_total mem tmp
  host="$(hostname -s)"
  # first line of `slurmd -C`: NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  hw="$(slurmd -C | head -n1)"
  mem_total="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem=$(( mem_total * MEM_PCT / 100 ))
  hw="$(sed -e "s/^NodeName=[^ ]* *//" -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$hw")"
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# generated by .ci/slurm_cluster.sh -- do not edit
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
AuthInfo=cred_expire=$REQUEUE_DELAY
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no systemd / cgroups on the CI host
ProctrackType=proctrack/linuxproc
TaskPlugin=$TASK_PLUGIN
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=$SCHED_INTERVAL,bf_interval=$SCHED_INTERVAL
SelectType=select/cons_tres
# CR_Core (not CR_Core_Memory): jobs without --mem would otherwise take the whole node's memory
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
KillWait=$KILL_WAIT
# accounting: real slurmdbd so that sacct answers
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  install -d -m 0755 "$ETC"
  if replace_if_changed "$tmp" "$SLURM_CONF" 0644; then
    # plugin changes need a full restart, `scontrol reconfigure` is not enough
    kill_pidfile "$PID_SLURMD"; kill_pidfile "$PID_CTLD"
  fi
}

node_state() { sinfo -h -n "$(hostname -s)" -o '%T' 2>/dev/null | head -n1; }

ensure_slurm_daemons() {
  if pid_alive "$PID_CTLD" && scontrol ping 2>/dev/null | grep -q UP; then
    say "slurmctld up (pid $(<"$PID_CTLD"))"
  else
    kill_pidfile "$PID_CTLD"
    say "starting slurmctld"
    slurmctld
    retry 20 sh -c 'scontrol ping | grep -q UP' || die "slurmctld not answering ($LOGS/slurmctld.log)"
  fi
  if pid_alive "$PID_SLURMD"; then
    say "slurmd up (pid $(<"$PID_SLURMD"))"
  else
    rm -f "$PID_SLURMD"
    say "starting slurmd"
    slurmd
  fi
  local host state="" t0; host="$(hostname -s)"; t0=$(date +%s)
  while :; do
    state="$(node_state)"
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      down*|drain*|fail*)
        # ReturnToService=2 normally handles this; nudge it after a few seconds
        [ $(( $(date +%s) - t0 )) -ge 5 ] && scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    [ $(( $(date +%s) - t0 )) -ge 40 ] && die "node is '$state', not idle ($LOGS/slurmctld.log, $LOGS/slurmd.log)"
    sleep 0.2
  done
  say "node $host is $state"
}

do_start() {
  [ "$(id -u)" -eq 0 ] || die "start must run as root"
  local t0; t0=$(date +%s.%N)
  ensure_packages
  install -d -m 0755 "$RUNDIR" "$LOGS" /var/spool/slurmctld /var/spool/slurmd
  ensure_munge
  write_slurm_conf        # first: sacctmgr reads slurm.conf to find slurmdbd
  ensure_mariadb
  ensure_slurmdbd
  register_cluster
  ensure_slurm_daemons
  sinfo
  say "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
}

do_stop() {
  [ "$(id -u)" -eq 0 ] || die "stop must run as root"
  local f
  for f in "$PID_SLURMD" "$PID_CTLD" "$PID_DBD" "$PID_MYSQL" "$PID_MUNGE"; do kill_pidfile "$f"; done
}

do_status() {
  local f rc=0
  for f in "$PID_MUNGE" "$PID_MYSQL" "$PID_DBD" "$PID_CTLD" "$PID_SLURMD"; do
    if pid_alive "$f"; then printf '%-28s running (pid %s)\n' "$f" "$(<"$f")"
    else printf '%-28s not running\n' "$f"; rc=1; fi
  done
  sinfo 2>/dev/null || rc=1
  sacctmgr -n -P list cluster format=Cluster,ControlHost 2>/dev/null | sed 's/^/accounting cluster: /' || true
  return $rc
}

case "${1:-}" in
  start)  do_start ;;
  stop)   do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
