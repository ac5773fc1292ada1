#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for tests/workflow/test_slurm.py (and for trying the
# SLURM profile by hand). Debian/Ubuntu packages (Slurm 22.05 on Debian 12), no accounting database.
#
#   tests/slurm/local_cluster.sh install   apt-get install munge slurmctld slurmd slurm-client (root + apt-get)
#   tests/slurm/local_cluster.sh start     write the configuration, start munged, slurmctld and slurmd, wait
#                                          until the node is idle; prints SLURM_CONF=<file> as its last line
#   tests/slurm/local_cluster.sh status    exit 0 when this cluster answers and its node is up
#   tests/slurm/local_cluster.sh stop      cancel every job, stop the daemons (by their pid files)
#
# Everything lives under $RADSTUDY_SLURM_DIR (default /tmp/radstudy-slurm): configuration, munge key and
# socket, state, spool, logs, pid files; the distro's munge and slurm services are never started. Clients
# find the cluster through SLURM_CONF:
#   export SLURM_CONF=$RADSTUDY_SLURM_DIR/etc/slurm.conf   (what 'start' prints)
# but inside a job, snakemake-executor-plugin-slurm-jobstep removes the SLURM_* variables (SLURM_CONF too)
# before it calls srun, and srun then reads /etc/slurm/slurm.conf. 'start' therefore links that file to
# the cluster's configuration (and 'stop' removes the link); it refuses to start where /etc/slurm/slurm.conf
# is something else (a real cluster's configuration).
#
# The node is declared with RADSTUDY_SLURM_CPUS / RADSTUDY_SLURM_MEM_MB (default: this machine's, as
# 'slurmd -C' reports them). Larger values are accepted (SlurmdParameters=config_overrides), so that the
# job sizes of workflow/profiles/slurm can be submitted as they are on a machine smaller than a real node.
#
# Ports: the first free ones from RADSTUDY_SLURM_PORT (default 16817). RADSTUDY_SLURM_OWNER (default: the caller
# of 'start'): a process id; once it is gone, a later 'start' (another directory) stops this cluster and takes
# /etc/slurm/slurm.conf over, so a killed test run does not block the next one.
#
# Settings that snakemake-executor-plugin-slurm needs without an accounting database (slurmdbd):
#   MinJobAge=3600   finished jobs stay visible to squeue (--slurm-status-command squeue), longer than the
#                    plugin's longest poll interval (180 s) and than a test run
#   no sacct         the plugin must be told --slurm-status-command squeue: with 'sacct' it polls forever
set -euo pipefail

DIR=${RADSTUDY_SLURM_DIR:-/tmp/radstudy-slurm}
ETC=$DIR/etc
CONF=$ETC/slurm.conf
MUNGE=$DIR/munge
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

say() { echo "[local_cluster $(date +%T)] $*" >&2; }
die() { say "$*"; exit 1; }

# wait_until <seconds> <command...>: poll every 0.5 s
wait_until() {
    local limit=$1
    shift
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.5
    done
}

have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null

cmd_install() {
    if have_slurm; then
        say "slurm and munge already installed ($(slurmctld -V))"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "installing needs root"
    command -v apt-get >/dev/null || die "no apt-get: install munge, slurmctld, slurmd and slurm-client yourself"
    # The packages' postinst would start the distro services with the default configuration: a policy-rc.d
    # that refuses (exit 101) keeps them stopped where the image has none.
    local policy=/usr/sbin/policy-rc.d made=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
    local ok=0
    "${apt[@]}" install -y --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null 2>&1 && ok=1
    if [[ $ok == 0 ]]; then
        "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends munge slurmctld slurmd slurm-client \
            >/dev/null && ok=1
    fi
    if [[ $made == 1 ]]; then rm -f "$policy"; fi
    [[ $ok == 1 ]] || die "apt-get install failed"
    say "installed $(slurmctld -V)"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {  # free_port <first candidate>
    local port=$1
    while port_in_use "$port"; do port=$((port + 1)); done
    echo "$port"
}

write_config() {
    mkdir -p "$ETC" "$DIR"/{state,spool,log}
    local hw cpus mem ctld_port slurmd_port
    hw=$(slurmd -C | head -1)
    cpus=${RADSTUDY_SLURM_CPUS:-$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")}
    mem=${RADSTUDY_SLURM_MEM_MB:-$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")}
    ctld_port=$(free_port "${RADSTUDY_SLURM_PORT:-16817}")
    slurmd_port=$(free_port $((ctld_port + 1)))
    cat >"$CONF" <<EOF
# written by tests/slurm/local_cluster.sh: a single-node test cluster, not a production configuration
ClusterName=radstudy
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE}/munge.socket
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
# no cgroups (a container): jobs are tracked by process group, which a cancelled job's processes keep when they
# are reparented (proctrack/linuxproc lost them: snakemake, which waits after SIGTERM, outlived its job);
# no CPU binding or memory enforcement
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# start a submitted batch job at once: slurmctld's default batch_sched_delay (3 s, for sites that take thousands
# of sbatch calls a second) delays the scheduling of every new job, and the test's jobs run one stage after another
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# no slurmdbd: squeue is the only job history, keep finished jobs in it for an hour
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket=${cpus} ThreadsPerCore=1 RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    mkdir -p "$MUNGE"
    if [[ ! -s $MUNGE/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE/munge.key"
        else
            dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 755 "$MUNGE"
    chmod 400 "$MUNGE/munge.key"
    local args=(--socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid"
        --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed")
    if [[ $(id -u) == 0 ]] && id munge >/dev/null 2>&1 && runuser -u munge -- test -x "$MUNGE"; then
        chown -R munge: "$MUNGE"
        runuser -u munge -- munged "${args[@]}"
    else
        # root, in a folder the munge user cannot reach (pytest's tmp_path is 0700): munged refuses without --force
        munged --force "${args[@]}" 2>/dev/null
    fi
    wait_until 10 bash -c "munge -S '$MUNGE/munge.socket' -n | unmunge -S '$MUNGE/munge.socket'" ||
        die "munged did not answer; see $MUNGE/munged.log"
}

node_up() { sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'; }

cmd_status() {
    export SLURM_CONF=$CONF
    [[ -s $CONF ]] && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_up
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# A test cluster whose owner (RADSTUDY_SLURM_OWNER, else the caller of 'start') is gone, e.g. a killed test run,
# is stopped and replaced; one whose owner still runs is left alone (and this start refuses).
take_over_stale() {
    [[ -L $SYSTEM_CONF ]] || return 0
    local conf previous owner
    conf=$(readlink "$SYSTEM_CONF")
    [[ $conf != "$CONF" ]] || return 0
    if [[ ! -e $conf ]]; then
        rm -f "$SYSTEM_CONF"
        return 0
    fi
    grep -q "written by tests/slurm/local_cluster.sh" "$conf" || return 0
    previous=$(dirname "$(dirname "$conf")")
    owner=$(cat "$previous/owner" 2>/dev/null || true)
    if [[ -n $owner ]] && kill -0 "$owner" 2>/dev/null; then return 0; fi
    say "stopping the stale test cluster of $previous"
    RADSTUDY_SLURM_DIR=$previous "$0" stop || true
}

cmd_start() {
    have_slurm || die "slurm is not installed (run: $0 install)"
    if cmd_status 2>/dev/null && [[ $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        say "already running"
    else
        [[ $(id -u) == 0 ]] || die "starting slurmd needs root"
        take_over_stale
        if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]] && [[ $(readlink "$SYSTEM_CONF") != "$CONF" ]]; then
            die "$SYSTEM_CONF exists and is not this test cluster's: not starting"
        fi
        cmd_stop >/dev/null 2>&1 || true  # leftovers of a half-started cluster
        rm -rf "$DIR"/state "$DIR"/spool "$DIR"/log
        write_config
        echo "${RADSTUDY_SLURM_OWNER:-$PPID}" >"$DIR/owner"
        export SLURM_CONF=$CONF
        start_munge
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -sfn "$CONF" "$SYSTEM_CONF"
        slurmctld -i -f "$CONF"
        slurmd -N "$NODE" -f "$CONF"
        if ! wait_until 60 node_up; then
            tail -n 20 "$DIR"/log/*.log >&2 || true
            die "the node did not come up"
        fi
        say "started: $(sinfo -h -o '%P %D %c cpus %m MB %T')"
    fi
    echo "SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid <pid file>: SIGTERM, up to 20 s, then SIGKILL
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

cmd_stop() {
    export SLURM_CONF=$CONF
    if [[ -s $CONF ]] && alive "$DIR/slurmctld.pid"; then
        # cancel what is left, and let slurmd clean up the job processes before it goes
        local jobs
        jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_until 30 bash -c '[[ -z $(squeue -h -t RUNNING,COMPLETING -o %i) ]]' || true
        fi
    fi
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$MUNGE/munged.pid"
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then rm -f "$SYSTEM_CONF"; fi
    say "stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    *)
        echo "usage: $0 install|start|status|stop" >&2
        exit 2
        ;;
esac
