#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, from Debian's packages (Slurm 22.05 on
# bookworm), with job accounting (slurmdbd + MariaDB) so that `sacct` reports true job states.
# No systemd or cgroups needed: the daemons are started by hand, in the background. As root:
#   scripts/slurm_cluster.sh up       # install what is missing, start, register accounting
#   scripts/slurm_cluster.sh status   # daemons, sinfo; exit status 1 if the cluster is unusable
#   scripts/slurm_cluster.sh down     # cancel its jobs, stop exactly the daemons `up` started
# Then, e.g.:
#   python run_bench.py -m experiment=memory_vs_seq_len hydra/launcher=slurm_cpu
#
# Everything (config, munge key and socket, database, state, spool, logs, pid files) lives in
# one folder, SLURM_CLUSTER_DIR (default /tmp/meltbench-slurm); `down` keeps it, so a later
# `up` reuses the database, accounting and job history; delete the folder for a fresh cluster.
#
# Discovery: Slurm's clients (sbatch, sacct, scancel: submitit runs them as subprocesses) read
# $SLURM_CONF, else /etc/slurm/slurm.conf. `up` links /etc/slurm/slurm.conf to the folder's
# slurm.conf when no slurm.conf exists there (a cluster of this script's making is then the
# only Slurm on the machine), so every shell and Python process finds it without setup; `down`
# removes that link again. If another slurm.conf exists there, it is left alone and you must
#   export SLURM_CONF=$SLURM_CLUSTER_DIR/etc/slurm.conf
# (printed by `up` and `status`). SLURM_CLUSTER_ETC_LINK=0 never touches /etc/slurm.
#
# Settings (environment): SLURM_CLUSTER_DIR, SLURM_CLUSTER_NAME (meltbench),
# SLURM_CLUSTER_PARTITION (cpu), SLURM_CLUSTER_DB_PORT (3307: the folder's own MariaDB, on
# 127.0.0.1 only), SLURM_CLUSTER_ETC_LINK (1). Slurm's own ports: 6817-6819 (its defaults).
#
# Why the main settings in slurm.conf (22.05, no cgroups):
#   ProctrackType=proctrack/pgid, TaskPlugin=task/none: neither needs cgroups or systemd; pgid (not
#     linuxproc) so that ending a job (time limit, scancel) kills the batch shell's children too:
#     a point runs in the batch shell (bench/sweep/slurm.py), and linuxproc let it outlive a TIMEOUT.
#   JobAcctGatherType=jobacct_gather/linux, JobAcctGatherFrequency=task=1 and
#     JobAcctGatherParams=OverMemoryKill: each step's memory is polled every second and a step
#     over its --mem is killed (22.05 has no MemLimitEnforce any more). sacct then says FAILED
#     (ExitCode 0:9, or 9:0 through srun) with the step "CANCELLED by 0" and MaxRSS > ReqMem, not
#     OUT_OF_MEMORY (that state needs cgroups); the job's stderr says "exceeded memory limit".
#   EnforcePartLimits=ALL, MaxMemPerNode=RealMemory on the partition, no GresTypes: a request the
#     node can never satisfy (more CPUs, more memory, any GPU) is refused by sbatch at once
#     instead of pending forever. AccountingStorageEnforce=associations,limits,qos: so is an
#     unknown --account or --qos (only root, and $SUDO_USER, are registered users).
#   SchedulerParameters=batch_sched_delay=0: a queued job starts at once (default: up to 3 s).
#   RealMemory from `slurmd -C` (never above it, or the node drains); DefMemPerCPU so a job
#     without --mem does not take the whole node.
set -euo pipefail

DIR=${SLURM_CLUSTER_DIR:-/tmp/meltbench-slurm}
CLUSTER=${SLURM_CLUSTER_NAME:-meltbench}
PARTITION=${SLURM_CLUSTER_PARTITION:-cpu}
DB_PORT=${SLURM_CLUSTER_DB_PORT:-3307}
ETC_LINK=${SLURM_CLUSTER_ETC_LINK:-1}
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

CONF=$DIR/etc/slurm.conf
DBD_CONF=$DIR/etc/slurmdbd.conf
MY_CNF=$DIR/etc/my.cnf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
DB_SOCKET=$DIR/db/mysqld.sock
export SLURM_CONF=$CONF   # for this script's own sbatch/sinfo/sacctmgr calls and the daemons

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Daemons: NAME -> pid file. A daemon counts as running when its pid file names a live process
# whose command is NAME (so a stale pid file or a recycled pid never counts, and `down` never
# signals a process it did not start).
# ---------------------------------------------------------------------------------------------
DAEMONS=(mariadbd munged slurmdbd slurmctld slurmd)   # start order; `down` stops in reverse
pidfile_of() {
    case $1 in
        mariadbd) echo "$DIR/db/mysqld.pid" ;;
        munged) echo "$DIR/munge/munged.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}
pid_of() {   # prints the pid if NAME runs (per its pid file), else fails
    local f pid comm
    f=$(pidfile_of "$1")
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' < "$f")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(< "/proc/$pid/comm")
    [[ $comm == "$1" ]] || return 1
    echo "$pid"
}
running() { pid_of "$1" > /dev/null; }

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for $what (logs: $DIR/log, $DIR/db/mysqld.log, $DIR/munge/munged.log)"
}

need_root() { [[ $(id -u) == 0 ]] || die "run as root (daemons run as root/munge/mysql, packages are installed with apt-get)"; }

# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing: ${missing[*]}"
    # The packages' maintainer scripts try to start services; without systemd/init they cannot
    # (policy-rc.d denies it or invoke-rc.d finds no runlevel), which is what we want.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" > "$DIR/log/apt.log" 2>&1 \
        || { apt-get update -qq > /dev/null 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" > "$DIR/log/apt.log" 2>&1; } \
        || die "apt-get install failed, see $DIR/log/apt.log"
}

write_if_changed() {   # write_if_changed FILE MODE: stdin -> FILE, only if the content differs
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$f"
    return 0
}

write_configs() {
    local host node_line mem changed=0
    host=$(hostname -s)
    # The node as slurmd sees it (CPUs, sockets, cores, threads, RealMemory): the node line must
    # not claim more, or slurmd registers with less and the node drains.
    node_line=$(slurmd -C | head -1)
    [[ $node_line == NodeName=* ]] || die "slurmd -C gave: $node_line"
    node_line=${node_line#NodeName=* }     # drop "NodeName=host"; keep CPUs=.. RealMemory=..
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node_line")

    [[ -s $DIR/etc/db.pass ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DIR/etc/db.pass")

    write_if_changed "$CONF" 644 << EOF && changed=1
# Written by scripts/slurm_cluster.sh: single-node cluster, all files under $DIR.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups, no systemd:
ProctrackType=proctrack/pgid
TaskPlugin=task/none
# Scheduling: cores and memory are consumable; a queued job starts at once.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=10
# Refuse at sbatch time what the partition/node can never run.
EnforcePartLimits=ALL
# Accounting (sacct) through slurmdbd; memory polled every second, a step over --mem is killed.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# The munge socket for connections to slurmdbd (AuthInfo's socket is not used for those).
AccountingStoragePass=$MUNGE_SOCKET
# Only registered users/accounts/QOS may submit: a mistyped --account or --qos is refused at once
# (without this, sbatch silently replaces it). Registered: root and the sudo user.
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 $node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE MaxMemPerNode=$mem State=UP
EOF

    # slurmdbd insists on mode 600, owned by SlurmUser (root).
    write_if_changed "$DBD_CONF" 600 << EOF && changed=1
# Written by scripts/slurm_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(< "$DIR/etc/db.pass")
StorageLoc=slurm_acct_db
EOF

    # MariaDB: its own datadir, socket and port; TCP on 127.0.0.1 only (slurmdbd connects by TCP).
    write_if_changed "$MY_CNF" 644 << EOF && changed=1
# Written by scripts/slurm_cluster.sh
[mysqld]
user=mysql
datadir=$DIR/db/data
socket=$DB_SOCKET
pid-file=$DIR/db/mysqld.pid
log-error=$DIR/db/mysqld.log
bind-address=127.0.0.1
port=$DB_PORT
performance_schema=OFF
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
# (slurmdbd logs that it recommends a larger innodb_buffer_pool_size: irrelevant at this size.)
[client]
socket=$DB_SOCKET
EOF
    if ((changed)) && { running slurmctld || running slurmdbd || running mariadbd; }; then
        log "WARNING: configuration changed while daemons run; apply it with: $0 down && $0 up"
    fi
}

start_mariadb() {
    running mariadbd && return 0
    if [[ ! -d $DIR/db/data/mysql ]]; then
        log "initialising MariaDB datadir"
        mariadb-install-db --defaults-file="$MY_CNF" --auth-root-authentication-method=socket \
            --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed, see $DIR/log/mariadb-install.log"
    fi
    log "starting mariadbd"
    # mariadbd stays in the foreground: detach it into its own session; it writes its pid file.
    setsid mariadbd --defaults-file="$MY_CNF" < /dev/null >> "$DIR/db/mysqld.log" 2>&1 &
    wait_for 60 mariadbd mariadb-admin --defaults-file="$MY_CNF" -u root ping
    wait_for 10 "mariadbd pid file" running mariadbd
}

setup_database() {   # idempotent: database, user and password for slurmdbd
    local pass
    pass=$(< "$DIR/etc/db.pass")
    mariadb --defaults-file="$MY_CNF" -u root << EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_munge() {
    running munged && return 0
    # The folder's own key and socket (no /run/munge, no /etc/munge): munged runs as user munge
    # and wants the socket's directory owned by munge, writable by nobody else, and searchable
    # by all (clients connect to the socket).
    install -d -o munge -g munge -m 711 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
    log "starting munged"
    rm -f "$MUNGE_SOCKET"   # a stale socket from an unclean stop would make munged refuse to start
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged bash -c "munge -n --socket='$MUNGE_SOCKET' | unmunge --socket='$MUNGE_SOCKET'"
}

start_slurmdbd() {
    running slurmdbd && return 0
    log "starting slurmdbd"
    slurmdbd   # daemonises; reads slurmdbd.conf next to \$SLURM_CONF
    wait_for 60 slurmdbd sacctmgr -n show cluster
}

register_accounting() {   # cluster, account and root user in the accounting database
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster) ]]; then
        log "registering cluster $CLUSTER in accounting"
        sacctmgr -i add cluster "$CLUSTER" > /dev/null
    fi
    if [[ -z $(sacctmgr -n -P show account "$CLUSTER" format=account) ]]; then
        sacctmgr -i add account "$CLUSTER" Cluster="$CLUSTER" Description="meltbench jobs" Organization=meltbench > /dev/null
    fi
    local user
    for user in root ${SUDO_USER:-}; do
        if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" user="$user" account="$CLUSTER" format=user) ]]; then
            sacctmgr -i add user "$user" Account="$CLUSTER" Cluster="$CLUSTER" DefaultAccount="$CLUSTER" > /dev/null
        fi
    done
}

start_slurmctld() {
    running slurmctld && return 0
    log "starting slurmctld"
    slurmctld -i   # -i: ignore unreadable state files (e.g. after an unclean stop)
    wait_for 30 slurmctld scontrol ping
}

start_slurmd() {
    running slurmd && return 0
    log "starting slurmd"
    slurmd
}

node_ready() {   # the node is up and schedulable (idle, mixed or allocated; not down/drained)
    local state
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1)
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

link_etc_conf() {
    [[ $ETC_LINK == 1 ]] || return 0
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then return 0; fi
    if [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
        log "$ETC_CONF exists and is not this cluster's: leaving it; use SLURM_CONF"
        return 0
    fi
    mkdir -p /etc/slurm
    ln -s "$CONF" "$ETC_CONF"
    log "linked $ETC_CONF -> $CONF"
}

etc_linked() { [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; }

cmd_up() {
    need_root
    local t0=$SECONDS
    # A unix socket path has at most 107 bytes.
    ((${#MUNGE_SOCKET} < 100 && ${#DB_SOCKET} < 100)) || die "SLURM_CLUSTER_DIR is too long for socket paths: $DIR"
    mkdir -p "$DIR"/{etc,log,run,spool/slurmctld,spool/slurmd}
    chmod 755 "$DIR"   # munge and mysql must reach their subfolders
    install_packages   # also creates the users munge and mysql
    install -d -o mysql -g mysql -m 750 "$DIR/db"
    write_configs
    start_mariadb
    setup_database
    start_munge
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmd
    wait_for 30 "node $(hostname -s) to become idle" node_ready
    link_etc_conf
    log "cluster $CLUSTER up in $((SECONDS - t0)) s (partition $PARTITION)"
    etc_linked || echo "export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------------
stop_daemon() {   # SIGTERM by pid file, wait up to 30 s for the process to exit, then SIGKILL
    local name=$1 pid i
    pid=$(pid_of "$name") || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.2
    done
    log "$name did not exit after 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
    need_root
    local i
    # Cancel this cluster's jobs first, so no slurmstepd (and job process) outlives slurmd.
    if running slurmctld && running slurmd; then
        local jobs
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
        if ((${#jobs[@]})); then
            log "cancelling jobs: ${jobs[*]}"
            scancel "${jobs[@]}" || true
            for ((i = 0; i < 150; i++)); do   # up to 30 s (KillWait=10 s, then SIGKILL)
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
    if etc_linked; then rm -f "$ETC_CONF" && log "removed link $ETC_CONF"; fi
    log "down (state kept in $DIR)"
}

# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
cmd_status() {   # as root: mariadbd's pid file is readable by root and mysql only
    local ok=0 name pid
    for name in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$name"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s not running\n' "$name"
            ok=1
        fi
    done
    if ((ok == 0)); then
        sinfo -N -o '%N %P %T %c %m %G' || ok=1
        node_ready || { echo "node not schedulable"; ok=1; }
        sacctmgr -n -P show cluster "$CLUSTER" format=cluster | grep -qx "$CLUSTER" \
            || { echo "cluster $CLUSTER not in accounting"; ok=1; }
    fi
    if etc_linked; then
        echo "config: $CONF (linked from $ETC_CONF)"
    else
        echo "config: $CONF; export SLURM_CONF=$CONF"
    fi
    ((ok == 0)) && echo "cluster $CLUSTER: usable" || echo "cluster $CLUSTER: NOT usable"
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
