#!/usr/bin/env bash
###############################################################################
#                                                                             #
#   !!!  THROWAWAY TEST / CI MACHINES ONLY  -- NEVER RUN ON A REAL CLUSTER  !!! #
#                                                                             #
#   This script turns the machine it runs on into a one-node SLURM cluster:   #
#   it apt-installs slurmctld/slurmd/munge, OVERWRITES /etc/slurm/slurm.conf  #
#   and /etc/slurm/gres.conf, creates a munge key if none exists, starts the  #
#   daemons as root by hand, and installs a `sacct` wrapper at                #
#   /usr/local/bin/sacct.  On a real cluster that would clobber the site      #
#   configuration.  It refuses to run unless it is root AND the environment   #
#   says this is a disposable machine (CI=true or SIMFLOW_ALLOW_LOCAL_SLURM=1).#
#                                                                             #
###############################################################################
#
# Usage:  SIMFLOW_ALLOW_LOCAL_SLURM=1 tests/slurm/setup_local_slurm.sh {start|stop|status}
#
#   start   install packages if missing, (re)write the config, start munged,
#           slurmctld and slurmd (restarting the SLURM daemons when the config
#           changed), wait for the node to be idle, install the sacct shim.
#           Safe to re-run: a second `start` with nothing changed is a no-op.
#   stop    stop slurmd, slurmctld and munged by the PIDs in their pid files.
#           Packages, config, state and the sacct shim stay.
#   status  daemon PIDs, `sinfo` and `squeue`.
#
# Target: Debian 12 (bookworm), slurm-wlm 22.05, no systemd (PID 1 is not an
# init system; the daemons are started by hand).  The cluster it builds:
#   * one node named `hostname -s`, reached at 127.0.0.1 (no DNS needed), with
#     the machine's CPU count and RealMemory = MemTotal - margin;
#   * two FAKE GPUs (`Gres=gpu:2`): character devices `c 1 3` (same as
#     /dev/null) under $FAKE_GPU_DIR, so SLURM hands out CUDA_VISIBLE_DEVICES
#     0/1 although the machine has no GPU;
#   * one partition `debug` (default, no time limit);
#   * no slurmdbd: accounting is off and completed jobs go to a jobcomp/filetxt
#     log.  The /usr/local/bin/sacct shim adds `--completion`, which makes
#     `sacct` read that log.  submitit needs sacct to notice jobs that die
#     without writing a result (scancel, OOM, time limit); without it
#     job.result() waits forever.
#
# Tunables (environment): SIMFLOW_SLURM_GPUS (default 2),
# SIMFLOW_SLURM_MEM_MARGIN_MB (default: max(512, 5% of MemTotal)),
# SIMFLOW_SLURM_WAIT_S (default 60, how long `start` waits for the node).

set -euo pipefail

T0=$(date +%s.%N)
readonly T0
readonly PROG=${0##*/}

readonly SLURM_ETC=/etc/slurm
readonly SLURM_CONF=$SLURM_ETC/slurm.conf
readonly GRES_CONF=$SLURM_ETC/gres.conf
readonly VAR_DIR=/var/lib/simflow-slurm          # state, spool, fake GPUs
readonly LOG_DIR=/var/log/simflow-slurm
readonly RUN_DIR=/run/simflow-slurm              # SLURM pid files
readonly FAKE_GPU_DIR=$VAR_DIR/fakegpu
readonly CTLD_PID=$RUN_DIR/slurmctld.pid
readonly SLURMD_PID=$RUN_DIR/slurmd.pid
readonly MUNGE_RUN=/run/munge
readonly MUNGE_PID=$MUNGE_RUN/munged.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly SACCT_SHIM=/usr/local/bin/sacct
readonly SACCT_REAL=/usr/bin/sacct
readonly SHIM_MARKER="simflow-local-slurm sacct shim"
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly N_GPUS=${SIMFLOW_SLURM_GPUS:-2}
readonly WAIT_S=${SIMFLOW_SLURM_WAIT_S:-60}

log()  { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

guard() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it writes /etc/slurm and starts daemons)."
    if [[ ${CI:-} != true && ${SIMFLOW_ALLOW_LOCAL_SLURM:-} != 1 ]]; then
        die "refusing to run: this script reconfigures the whole machine as a throwaway one-node SLURM.
       On a disposable test/CI machine, set CI=true or SIMFLOW_ALLOW_LOCAL_SLURM=1 and re-run."
    fi
    [[ $N_GPUS =~ ^[1-9][0-9]*$ ]] || die "SIMFLOW_SLURM_GPUS must be a positive integer, got '$N_GPUS'."
}

# ---------------------------------------------------------------- processes --

# proc_alive PID COMM: true if PID is a live (not zombie) process named COMM.
# Checking the name guards against a stale pid file whose PID was reused.
proc_alive() {
    local pid=$1 comm=$2 stat
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # /proc/PID/stat is "PID (COMM) STATE ..."; a zombie (Z) has already exited.
    [[ $stat == "$pid ($comm) "* && ${stat#*) } != Z* ]]
}

# pid_alive PIDFILE COMM: true if PIDFILE names a live process named COMM.
pid_alive() {
    local pidfile=$1 comm=$2
    [[ -s $pidfile ]] || return 1
    proc_alive "$(<"$pidfile")" "$comm"
}

# stop_pidfile PIDFILE COMM: TERM the daemon, wait up to 10 s for the PROCESS
# to go (slurmctld removes its pid file before it has finished saving state),
# then KILL.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    if ! pid_alive "$pidfile" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        proc_alive "$pid" "$comm" || break
        sleep 0.1
    done
    if proc_alive "$pid" "$comm"; then
        log "$comm (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
    log "stopped $comm (pid $pid)"
}

# A live daemon of the same name that we did not start (e.g. one started by
# systemd on a CI image that has it) would hold the ports; say so instead of
# fighting it. Zombies (exited, not yet reaped by PID 1) do not count.
check_foreign() {
    local comm=$1 pid others=()
    for pid in $(pgrep -x "$comm" || true); do
        proc_alive "$pid" "$comm" && others+=("$pid")
    done
    if ((${#others[@]})); then
        die "a '$comm' process is running that this script did not start (pid(s): ${others[*]}).
       Stop it first (e.g. 'systemctl stop $comm'), then re-run '$PROG start'."
    fi
}

# ----------------------------------------------------------------- packages --

install_packages() {
    local missing=() p status
    for p in "${PACKAGES[@]}"; do
        # (Capture first: with pipefail, 'cmd | grep -q' can fail on SIGPIPE.)
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $status == *'install ok installed'* ]] || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package postinst scripts from starting the daemons with the stock
    # config (with systemd they would; we start them ourselves below).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    # apt-get update only if the package index does not know a package yet.
    local need_update=0
    for p in "${missing[@]}"; do
        status=$(apt-cache policy "$p" 2>/dev/null || true)
        [[ $status =~ Candidate:\ [0-9] ]] || need_update=1
    done
    if ((need_update)); then
        log "apt-get update (package index does not list ${missing[*]})"
        apt-get update -qq
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)."
}

slurm_version() {  # prints e.g. 22.05.8
    slurmctld -V 2>/dev/null | awk '{print $2}'
}

# ------------------------------------------------------------------- config --

NODE=""; CPUS=""; REAL_MEM=""; DEF_MEM=""

compute_node_facts() {
    NODE=$(hostname -s 2>/dev/null || hostname)
    [[ -n $NODE ]] || die "hostname -s printed nothing; set a hostname first."
    # The CPUs slurmd itself detects, so the node is never INVAL for "low CPU count".
    CPUS=$(slurmd -C 2>/dev/null | sed -n '1s/.*CPUs=\([0-9]*\).*/\1/p' || true)
    [[ -n $CPUS ]] || CPUS=$(nproc --all)
    local total_mb margin
    total_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)
    # Leave a margin below the physical memory: slurmd marks the node INVAL if
    # it finds less memory than RealMemory, and the OS needs some anyway.
    margin=${SIMFLOW_SLURM_MEM_MARGIN_MB:-$(( total_mb / 20 > 512 ? total_mb / 20 : 512 ))}
    REAL_MEM=$((total_mb - margin))
    ((REAL_MEM >= 256)) || die "only ${total_mb} MB of memory (RealMemory would be ${REAL_MEM} MB); need more."
    # Default memory per allocated CPU: an even share of the node, so that CPUs
    # (not memory) limit how many jobs run at once. Without DefMemPerCPU every
    # job would be given the whole node's memory and jobs would run one by one.
    DEF_MEM=$((REAL_MEM / CPUS))
}

render_slurm_conf() {
    local version major minor cred_line
    version=$(slurm_version)
    major=${version%%.*}; minor=${version#*.}; minor=${minor%%.*}
    # 22.05 (Debian 12) calls it CryptoType; 23.11 renamed it CredType.
    if ((10#$major > 23 || (10#$major == 23 && 10#$minor >= 11))); then
        cred_line="CredType=cred/munge"
    else
        cred_line="CryptoType=crypto/munge"
    fi
    cat <<EOF
# Written by tests/slurm/setup_local_slurm.sh for a THROWAWAY one-node test
# cluster (slurm $version). Do not edit: re-running the script overwrites it.
ClusterName=simflow-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
$cred_line
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$VAR_DIR/state
SlurmdSpoolDir=$VAR_DIR/spool
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Fast turnaround for tests: schedule on every event, backfill every second,
# short kill grace, keep finished jobs visible in squeue for 10 minutes.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,bf_resolution=1
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$DEF_MEM
GresTypes=gpu
# No slurmdbd: completed jobs are written to a text log that
# 'sacct --completion' (the /usr/local/bin/sacct shim) reads.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM Gres=gpu:$N_GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

render_gres_conf() {
    cat <<EOF
# Written by tests/slurm/setup_local_slurm.sh: $N_GPUS FAKE GPUs. The files are
# character devices 'c 1 3' (/dev/null's numbers); slurmd only needs File= to
# count them and to set CUDA_VISIBLE_DEVICES. Without File= it reports 0 GPUs
# and the node goes INVAL.
AutoDetect=off
NodeName=$NODE Name=gpu File=$FAKE_GPU_DIR/fakegpu[0-$((N_GPUS - 1))]
EOF
}

make_fake_gpus() {
    mkdir -p "$FAKE_GPU_DIR"
    local i dev
    for ((i = 0; i < N_GPUS; i++)); do
        dev=$FAKE_GPU_DIR/fakegpu$i
        [[ -c $dev ]] && continue
        rm -f "$dev"
        mknod -m 666 "$dev" c 1 3 || die "mknod $dev failed; this machine does not allow device nodes."
    done
}

# install_if_changed NEW DEST: move NEW over DEST when they differ; echo 1 if changed.
install_if_changed() {
    local new=$1 dest=$2
    if [[ -f $dest ]] && cmp -s "$new" "$dest"; then
        rm -f "$new"; echo 0
    else
        install -m 644 "$new" "$dest"; rm -f "$new"; echo 1
    fi
}

write_config() {  # echoes 1 if slurm.conf or gres.conf changed
    mkdir -p "$SLURM_ETC" "$VAR_DIR/state" "$VAR_DIR/spool" "$LOG_DIR" "$RUN_DIR"
    make_fake_gpus
    local tmp c1 c2
    tmp=$(mktemp); render_slurm_conf >"$tmp"; c1=$(install_if_changed "$tmp" "$SLURM_CONF")
    tmp=$(mktemp); render_gres_conf >"$tmp";  c2=$(install_if_changed "$tmp" "$GRES_CONF")
    echo $((c1 || c2))
}

install_sacct_shim() {
    local tmp
    if [[ -e $SACCT_SHIM ]] && ! grep -q "$SHIM_MARKER" "$SACCT_SHIM"; then
        die "$SACCT_SHIM exists and is not this script's shim; move it away first."
    fi
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
#!/bin/sh
# $SHIM_MARKER (written by tests/slurm/setup_local_slurm.sh).
# The throwaway test cluster has no slurmdbd, so plain 'sacct' fails with
# "Slurm accounting storage is disabled". '--completion' reads the
# jobcomp/filetxt log instead; it lists finished jobs only, which is what
# submitit's status check needs to notice a cancelled or killed job.
exec $SACCT_REAL --completion "\$@"
EOF
    if [[ -f $SACCT_SHIM ]] && cmp -s "$tmp" "$SACCT_SHIM"; then
        rm -f "$tmp"
    else
        install -m 755 "$tmp" "$SACCT_SHIM"; rm -f "$tmp"
        log "installed $SACCT_SHIM (forwards to $SACCT_REAL --completion)"
    fi
}

# ------------------------------------------------------------------ daemons --

ensure_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p "${MUNGE_KEY%/*}"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if pid_alive "$MUNGE_PID" munged; then
        return 0
    fi
    if munge_works; then
        log "a munged this script did not start is answering; using it"
        return 0
    fi
    ensure_munge_key
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 755 "$MUNGE_RUN"
    rm -f "$MUNGE_PID"
    # munged refuses to run as root; run it as the package's 'munge' user.
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    local i
    for ((i = 0; i < 50; i++)); do munge_works && break; sleep 0.1; done
    munge_works || die "munged did not start; see /var/log/munge/munged.log"
    log "started munged (pid $(<"$MUNGE_PID"))"
}

start_daemon() {  # start_daemon COMM PIDFILE CMD...
    local comm=$1 pidfile=$2 i
    shift 2
    pid_alive "$pidfile" "$comm" && return 0
    check_foreign "$comm"
    rm -f "$pidfile"
    "$@" || die "$comm failed to start; see $LOG_DIR/$comm.log"
    for ((i = 0; i < 50; i++)); do pid_alive "$pidfile" "$comm" && break; sleep 0.1; done
    pid_alive "$pidfile" "$comm" || die "$comm exited right after starting; see $LOG_DIR/$comm.log"
    log "started $comm (pid $(<"$pidfile"))"
}

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | sed -n 1p; }

wait_node_ready() {
    local deadline=$((SECONDS + WAIT_S)) st last_resume=-10
    while ((SECONDS < deadline)); do
        st=$(node_state || true)
        case $st in
            idle | mix | alloc | comp | mix- | alloc- | comp-) return 0 ;;  # responding and usable
            *'*'* | '' | unk) ;;   # '*': slurmd not (yet) responding; '': controller not up yet
            down | drain | drng | inval | fail | maint | drain~ | down~)
                # A state saved from an earlier run (or a config mismatch now
                # fixed) keeps the node unusable until it is resumed.
                if ((SECONDS - last_resume >= 2)); then
                    log "node $NODE is '$st'; resuming it"
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    last_resume=$SECONDS
                fi ;;
        esac
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    scontrol show node "$NODE" 2>/dev/null | grep -i reason >&2 || true
    die "node $NODE not ready after ${WAIT_S}s (state '${st:-?}'); see $LOG_DIR/slurmctld.log and slurmd.log"
}

# ----------------------------------------------------------------- commands --

cmd_start() {
    install_packages
    compute_node_facts
    local changed
    changed=$(write_config)
    if ((changed)); then
        log "config written to $SLURM_CONF and $GRES_CONF"
        # Running daemons must pick up the new node/GRES definition: restart them.
        if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then
            log "config changed: restarting slurmctld and slurmd"
            stop_pidfile "$SLURMD_PID" slurmd
            stop_pidfile "$CTLD_PID" slurmctld
        fi
    fi
    start_munge
    start_daemon slurmctld "$CTLD_PID" /usr/sbin/slurmctld
    start_daemon slurmd "$SLURMD_PID" /usr/sbin/slurmd -N "$NODE"
    wait_node_ready
    install_sacct_shim
    echo "local SLURM $(slurm_version) up: node=$NODE cpus=$CPUS mem=${REAL_MEM}MB (DefMemPerCPU=${DEF_MEM}MB)" \
         "gpus=$N_GPUS (fake) partition=debug state=$(node_state) in $(elapsed)s"
}

cmd_stop() {
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged
    echo "local SLURM stopped in $(elapsed)s"
}

cmd_status() {
    local comm pidfile pair rc=0
    for pair in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        comm=${pair%%:*}; pidfile=${pair#*:}
        if pid_alive "$pidfile" "$comm"; then
            echo "$comm: running (pid $(<"$pidfile"))"
        else
            echo "$comm: not running"; rc=1
        fi
    done
    if command -v sinfo >/dev/null && ((rc == 0)); then
        sinfo -N -o '%N %P %t %c %m %G' || rc=1
        squeue || rc=1
    fi
    return $rc
}

main() {
    local cmd=${1:-}
    case $cmd in
        start | stop | status) ;;
        *) die "usage: $PROG {start|stop|status}  (got '${cmd}')" ;;
    esac
    guard
    "cmd_$cmd"
}

main "$@"
