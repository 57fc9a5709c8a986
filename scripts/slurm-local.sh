#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests (tests/test_slurm.py) and for trying
# `snakemake --profile ...` against Slurm without a cluster. Needs root and Debian's packages.
#   scripts/slurm-local.sh start   # install if missing, write /etc/slurm/slurm.conf, start
#                                  # munged, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm-local.sh stop    # stop the daemons started by `start` (by their pid files)
#   scripts/slurm-local.sh status
# No accounting database: `sacct` does not work, so Snakemake's Slurm executor needs
# `slurm-status-command: squeue` and `slurm-no-account: true` (see tests/slurm-profile).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"

log() { echo "[slurm-local] $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sinfo >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { log "not root and Slurm is not installed"; return 1; }
  command -v apt-get >/dev/null || { log "no apt-get: cannot install Slurm"; return 1; }
  log "installing slurmctld slurmd slurm-client munge"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local host cpus mem
  host="$(hostname)"
  cpus="$(nproc)"
  mem="$(free -m | awk '/^Mem:/ {print int($4 * 0.8)}')"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF.new" <<EOF
# written by scripts/slurm-local.sh: one node, no accounting
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # keep the file (and the memory figure in it) of a running controller
  if alive /run/slurmctld.pid && [ -f "$CONF" ]; then
    rm -f "$CONF.new"
  else
    mv "$CONF.new" "$CONF"
  fi
}

start_munge() {
  alive /run/munge/munged.pid && return 0
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [ -f /etc/munge/munge.key ] || mungekey -c 2>/dev/null || mungekey --create
  chown -R munge: /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c /usr/sbin/munged
  munge -n | unmunge >/dev/null
}

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -1; }  # '*': not responding

start() {
  install
  write_conf
  start_munge
  # -c: cold start, forget jobs of an earlier run (their processes are gone)
  alive /run/slurmctld.pid || slurmctld -c
  alive /run/slurmd.pid || slurmd
  local host state t0=$SECONDS
  host="$(hostname)"
  while :; do
    state="$(node_state)"
    case "$state" in
      down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
      *'*') ;;  # slurmd has not registered yet
      idle|mix|alloc) break ;;
    esac
    if (( SECONDS - t0 > WAIT_S )); then
      log "node not idle after ${WAIT_S}s (state: '${state:-none}'); see /var/log/slurm/"
      return 1
    fi
    sleep 1
  done
  log "node $host $state after $((SECONDS - t0))s: $(sinfo -h -o '%P %a %D %c cpus %m MB')"
}

stop() {
  local f pid
  # this Slurm exists only for local runs: cancel what is still queued or running on it
  if alive /run/slurmctld.pid; then
    timeout 20 squeue -h -o %i 2>/dev/null | xargs -r timeout 20 scancel 2>/dev/null || true
  fi
  for f in "${PIDS[@]}"; do
    alive "$f" || continue
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    log "stopped $(basename "$f" .pid) ($pid)"
  done
}

status() {
  local f
  for f in "${PIDS[@]}"; do
    if alive "$f"; then echo "$(basename "$f" .pid): running ($(cat "$f"))";
    else echo "$(basename "$f" .pid): stopped"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
