#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests of `reproduce_table.py --launcher slurm`
# and of training under `srun` (tests/test_slurm.py).
#
#   tests/slurm/start_local_slurm.sh          # install (if missing), configure, start; returns when the node is idle
#   tests/slurm/start_local_slurm.sh stop     # stop slurmd, slurmctld and munged started by this script
#   tests/slurm/start_local_slurm.sh status   # sinfo of the cluster
#
# Needs root (CI runs as root): installs slurm-wlm and munge with apt-get when they are missing (about 30 s),
# writes /etc/slurm/slurm.conf for one node named after this machine (2 CPUs, no GPU, 80 % of its memory,
# no accounting, no cgroups), starts munged, slurmctld and slurmd and waits until the node is idle (about 5 s).
# Idempotent: a second start with the daemons running only waits for the node. It refuses to overwrite a
# slurm.conf it did not write (a machine that is part of a real cluster). Daemon logs and state:
# /var/tmp/ioupos-slurm/. Nothing here is needed on a developer's machine: without SLURM the SLURM tests skip
# (with IOUPOS_REQUIRE_SLURM=1, as .ci/run sets it, they fail instead).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by ioupos tests/slurm/start_local_slurm.sh"
STATE=/var/tmp/ioupos-slurm
NODE="$(hostname -s)"
CPUS=2
WAIT_S=60

die() {
    echo "start_local_slurm.sh: $*" >&2
    exit 1
}

pid_alive() { # pid file
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
    for d in slurmd slurmctld; do
        if pid_alive "$STATE/$d.pid"; then
            kill "$(cat "$STATE/$d.pid")" || true
        fi
    done
    for _ in $(seq 50); do
        pid_alive "$STATE/slurmd.pid" || pid_alive "$STATE/slurmctld.pid" || break
        sleep 0.2
    done
    if pid_alive "$STATE/munged.pid"; then
        kill "$(cat "$STATE/munged.pid")" || true
    fi
    echo "local SLURM stopped"
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root: install them (apt-get install slurm-wlm munge) or run as root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
    echo "installing slurm-wlm and munge ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d"
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
$MARK
ClusterName=ioupos
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after this many seconds (default 120), for the requeue tests
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=30
KillWait=5
InactiveLimit=0
MinJobAge=600
NodeName=$NODE CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    mv "$tmp" "$CONF"
    return 0
}

munge_works() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_works; then
        return # ours from an earlier start, or the system's
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force --pid-file="$STATE/munged.pid" ||
        die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        if munge_works; then return; fi
        sleep 0.1
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

node_state() {
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1
}

start() {
    install
    mkdir -p "$STATE"
    chown munge:munge "$STATE" 2>/dev/null || true
    chmod 755 "$STATE"
    local changed=0
    if write_conf; then changed=1; fi
    start_munge
    if [ "$changed" = 1 ]; then
        # a new configuration: restart the daemons that run with the old one
        for d in slurmd slurmctld; do
            if pid_alive "$STATE/$d.pid"; then
                kill "$(cat "$STATE/$d.pid")"
                for _ in $(seq 50); do pid_alive "$STATE/$d.pid" || break; sleep 0.2; done
            fi
        done
    fi
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd || die "slurmd did not start (see $STATE/slurmd.log)"
    fi
    local state=""
    for _ in $(seq $((WAIT_S * 5))); do
        state="$(node_state)"
        case "$state" in
        idle | mixed | allocated) break ;;
        down* | drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    case "$state" in
    idle | mixed | allocated) ;;
    *) die "node $NODE is '${state:-unknown}' after ${WAIT_S} s (see $STATE/slurmctld.log and $STATE/slurmd.log)" ;;
    esac
    echo "local SLURM is up: node $NODE ($CPUS CPUs) is $state; logs in $STATE"
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
status) sinfo ;;
*) die "usage: $0 [start|stop|status]" ;;
esac
