#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests (tests/test_slurm.py, issue 7).
#
#   tests/slurm_setup.sh STATE_DIR      # prints SLURM_CONF=STATE_DIR/slurm.conf when ready
#   tests/slurm_teardown.sh STATE_DIR   # stops only the daemons this script started
#
# Debian's slurmctld, slurmd, slurm-client and munge are installed with apt when missing (root
# only). The daemons are started directly (no systemd here); the PIDs of the processes started
# are written to STATE_DIR/pids ("name pid" per line) and nothing else is ever stopped; the
# one file made outside STATE_DIR, a link /etc/slurm/slurm.conf, is listed there too.
# Exit status: 0 ready; 77 cannot be set up here (reason on stderr: the test skips); 1 failed.
set -euo pipefail

STATE=${1:?usage: slurm_setup.sh STATE_DIR}
SKIP=77
skip() { echo "slurm_setup: $*" >&2; exit "$SKIP"; }
fail() { echo "slurm_setup: $*" >&2; exit 1; }

# 1. Packages: install only what is missing, only as root, only through apt.
needed=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
        || needed+=("${pair#*:}")
done
if [ "${#needed[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || skip "not root: cannot install ${needed[*]}"
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install ${needed[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends "${needed[@]}" \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${needed[@]}"; }
    } >"${TMPDIR:-/tmp}/limbtrack-slurm-apt.log" 2>&1 \
        || skip "apt-get install ${needed[*]} failed (see ${TMPDIR:-/tmp}/limbtrack-slurm-apt.log)"
fi
[ "$(id -u)" -eq 0 ] || skip "not root: slurmd must run as root to start jobs as the user"
PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$STATE"/{ctld,spool,log}
STATE=$(cd "$STATE" && pwd)
CONF=$STATE/slurm.conf
PIDS=$STATE/pids
touch "$PIDS"

alive() {  # alive NAME: the recorded daemon NAME is still running
    local pid
    pid=$(awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n 1)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# 2. munge: munged runs as user munge and needs /run/munge; reuse one that already answers.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # setpriv execs (no extra process), so $! is munged itself; -F: no fork.
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --force \
        >"$STATE/log/munged.out" 2>&1 </dev/null &
    echo "munged $!" >>"$PIDS"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null || fail "munged did not start ($STATE/log/munged.out)"
fi

# 3. slurm.conf: one node named localhost with this machine's hardware (slurmd -C).
hardware=$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //')
memory=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$hardware")
# Leave the daemons and the submitting Snakemake some memory.
hardware=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((memory * 9 / 10))/" <<<"$hardware")
cat >"$CONF" <<CONF
# Written by tests/slurm_setup.sh: a throw-away one-node cluster for the tests.
ClusterName=limbtrack
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups here: track job processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting storage (sacct does not work): the tests query squeue, and squeue must still
# see a finished job until Snakemake's slurm executor has looked at it: MinJobAge >= 3 x its
# initial status delay (--slurm-init-seconds-before-status-checks: 40 s by default, 20 s in
# profiles/slurm, 2 s in the test), else the plugin falls back to sacct.
AccountingStorageType=accounting_storage/none
MinJobAge=300
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job with no memory request would take the whole node.
DefMemPerCPU=1000
ReturnToService=2
SchedulerType=sched/backfill
NodeName=localhost $hardware State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$CONF
# Also at SLURM's default place: Snakemake's jobstep executor clears every SLURM_* variable
# (SLURM_CONF too) before its srun inside a job (snakemake-executor-plugin-slurm issue 164).
# A link is made only where no configuration exists; teardown removes it.
DEFAULT_CONF=/etc/slurm/slurm.conf
if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$CONF" ]; then
    :
elif [ -e "$DEFAULT_CONF" ] || [ -L "$DEFAULT_CONF" ]; then
    skip "$DEFAULT_CONF already exists (a real SLURM?); not replacing it"
else
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -s "$CONF" "$DEFAULT_CONF"
    echo "link $DEFAULT_CONF" >>"$PIDS"
fi

# 4. slurmctld and slurmd in the foreground (-D), detached from the caller's session.
if ! alive slurmctld; then
    setsid /usr/sbin/slurmctld -D -i -f "$CONF" >"$STATE/log/slurmctld.out" 2>&1 </dev/null &
    echo "slurmctld $!" >>"$PIDS"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || fail "slurmctld did not start ($STATE/log/slurmctld.log)"
if ! alive slurmd; then
    setsid /usr/sbin/slurmd -D -N localhost -f "$CONF" >"$STATE/log/slurmd.out" 2>&1 </dev/null &
    echo "slurmd $!" >>"$PIDS"
fi
state=""
for _ in $(seq 100); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case $state in idle*|mixed*|allocated*) break ;; esac
    sleep 0.2
done
case $state in
    idle*|mixed*|allocated*) ;;
    *) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
       sleep 1
       state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
       case $state in idle*|mixed*|allocated*) ;;
           *) fail "node localhost is '$state', not idle ($STATE/log/slurmd.log)" ;; esac ;;
esac
echo "SLURM_CONF=$CONF"
