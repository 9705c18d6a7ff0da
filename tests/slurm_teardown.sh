#!/usr/bin/env bash
# Stops the daemons tests/slurm_setup.sh started (by the PIDs it recorded), nothing else, and
# removes the /etc/slurm/slurm.conf link it made.
#   tests/slurm_teardown.sh STATE_DIR
set -uo pipefail

STATE=${1:?usage: slurm_teardown.sh STATE_DIR}
PIDS=$STATE/pids
[ -f "$PIDS" ] || exit 0
STATE=$(cd "$STATE" && pwd)
PIDS=$STATE/pids
PATH=$PATH:/usr/sbin:/sbin

# Jobs still queued or running on this private cluster would outlive slurmd.
if [ -f "$STATE/slurm.conf" ]; then
    SLURM_CONF=$STATE/slurm.conf timeout 10 scancel --cluster=limbtrack --full \
        --user="$(id -un)" 2>/dev/null || true
fi

# slurmd first, munged last; a PID is signalled only while it is still the program started.
for name in slurmd slurmctld munged; do
    awk -v n="$name" '$1 == n {print $2}' "$PIDS" | while read -r pid; do
        [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
done
# The link to our slurm.conf at SLURM's default place, if still ours.
awk '$1 == "link" {print $2}' "$PIDS" | while read -r link; do
    [ -L "$link" ] && [ "$(readlink "$link")" = "$STATE/slurm.conf" ] && rm -f "$link"
done
: >"$PIDS"
