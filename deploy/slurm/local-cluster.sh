#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `hoverdask cluster slurm` / `run --slurm` on a
# workstation and to run the tests marked `slurm`.
#
#   sudo deploy/slurm/local-cluster.sh start    # install (apt) if needed, start munge + slurm
#   sudo deploy/slurm/local-cluster.sh status   # what runs; sinfo
#   sudo deploy/slurm/local-cluster.sh stop     # cancel every job, stop the daemons
#
# Needs root and a Debian/Ubuntu system (apt) or slurmctld, slurmd and munged already installed.
# Works without systemd: the daemons are started directly; pid files and logs live in the state
# folder ($HOVERDASK_SLURM_STATE, default /var/lib/hoverdask-slurm). The configuration is written
# to /etc/slurm/slurm.conf (where sinfo/sbatch look) with this machine's hostname, cores and
# memory (`slurmd -C`), one partition `debug`; an existing slurm.conf that this script did not
# write is never touched. Start and stop are idempotent.
set -euo pipefail

STATE=${HOVERDASK_SLURM_STATE:-/var/lib/hoverdask-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by hoverdask deploy/slurm/local-cluster.sh"
WAIT_S=${HOVERDASK_SLURM_WAIT_S:-60}

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sinfo >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are not installed and there is no apt-get"
    say "installing slurmctld slurmd slurm-client munge (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$STATE/log/apt.log" 2>&1 \
        || { apt-get update >>"$STATE/log/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                slurmctld slurmd slurm-client munge >>"$STATE/log/apt.log" 2>&1; } \
        || die "apt-get install failed; see $STATE/log/apt.log"
}

write_conf() {
    if [[ -e $CONF ]] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script; refusing to replace it"
    fi
    local host node
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ... RealMemory=24105"
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    mkdir -p "$CONF_DIR"
    cat >"$CONF.tmp" <<EOF
$MARK; replaced on every start
ClusterName=hoverdask-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups or systemd needed (containers, workstations)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
KillWait=5
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged already answers (ours or the system's)
    fi
    [[ -s /etc/munge/munge.key ]] || {
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --force; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 600 /etc/munge/munge.key
    }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -xn munged >"$STATE/munged.pid"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not answer; see /var/log/munge/munged.log"
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

start() {
    [[ $EUID -eq 0 ]] || die "run as root (sudo): the SLURM daemons run as root"
    mkdir -p "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd"
    install_packages
    write_conf
    start_munge
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"
    fi
    local deadline=$((SECONDS + WAIT_S)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle* | mixed* | allocated*) break ;;
            down* | drain* | fail*)  # left so by an earlier run that was stopped mid-job
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    case $state in
        idle* | mixed* | allocated*) ;;
        *) die "the node is '${state:-not reported}' after ${WAIT_S} s; see $STATE/log/" ;;
    esac
    say "running: partition debug, node $(hostname -s) ($state); logs in $STATE/log"
}

stop() {
    [[ $EUID -eq 0 ]] || die "run as root (sudo)"
    if alive "$STATE/slurmctld.pid"; then
        # jobs first: slurmstepd outlives slurmd, and would leave the job's processes running
        scancel --full --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        alive "$STATE/$name.pid" || { rm -f "$STATE/$name.pid"; continue; }
        pid=$(cat "$STATE/$name.pid")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$STATE/$name.pid"
        say "stopped $name"
    done
    say "stopped"
}

status() {
    local name running=0
    for name in munged slurmctld slurmd; do
        if alive "$STATE/$name.pid"; then
            say "$name running (pid $(cat "$STATE/$name.pid"))"
            running=$((running + 1))
        else
            say "$name not running"
        fi
    done
    if alive "$STATE/slurmctld.pid"; then
        sinfo || true
        squeue || true
    fi
    [[ $running -ge 2 ]]  # slurmctld + slurmd (munged may be the system's)
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
