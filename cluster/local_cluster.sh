#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start`
# process with its own node name and CPUs, token authentication on. The shape of the KubeRay and VM
# clusters (a head with num-cpus 0, workers that run the replicas and actors), to try `serve deploy`
# and `ray job submit` across nodes without Kubernetes.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-worker C] [--gcs-redis] [--state-dir DIR]
#   cluster/local_cluster.sh status [--state-dir DIR]
#   cluster/local_cluster.sh stop [--state-dir DIR]
#   cluster/local_cluster.sh kill-head [--state-dir DIR]      # crash the head (SIGKILL); workers stay
#   cluster/local_cluster.sh restart-head [--state-dir DIR]   # a new head on the same ports (--gcs-redis)
#
# It stops exactly what it started and never another Ray cluster on the machine, which `ray stop`
# would kill too (it kills every Ray process of the user). Each node runs `ray start --block` as the
# leader of a new process group (setsid), whose pid goes into the state dir; `stop` signals those
# processes (on SIGTERM, `ray start --block` stops the processes it started) and waits until every
# process of their groups, and every descendant, is gone, killing what is left after a grace period.
# The head gets a fresh --temp-dir, which workers inherit, so this cluster's sockets, logs and
# session files stay out of /tmp/ray, where other clusters and `address="auto"` look.
# Serve's proxy on worker-i listens on a free port of its own (RAY_SERVE_WORKER_PROXY_HTTP_PORT,
# recorded as FLUXRAY_WORKER_<i>_SERVE_PORT in state.env); the head's keeps the serve config's port.
# On one machine every proxy would otherwise bind the same address, and a client could not choose
# to go through a worker's proxy, as KubeRay's serve Service does.
#
# GCS fault tolerance (--gcs-redis): a `redis-server` of the cluster's own (loopback, a free port, a
# random password, its data in the state dir, its own process group, stopped by `stop` after the
# nodes) holds the GCS's tables, the mechanism of KubeRay's gcsFaultToleranceOptions: the head gets
# RAY_REDIS_ADDRESS, --redis-password and a storage namespace of its own
# (RAY_external_storage_namespace); the workers wait up to 600 s for a lost GCS to come back
# (RAY_gcs_rpc_server_reconnect_timeout_s, KubeRay's value for worker pods; Ray's default is 60 s).
# `kill-head` SIGKILLs every process of the head node (a crash, not a stop) and leaves the workers
# and Redis running; `restart-head` starts a head with the same GCS and dashboard ports, temp dir,
# token and Redis, which takes the workers, and the actors on them, back.
set -euo pipefail
shopt -s extglob

usage() { sed -n '7,11s/^#   //p' "$0"; }
die() {
    echo "local_cluster.sh: $*" >&2
    exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${FLUXRAY_CLUSTER_DIR:-${TMPDIR:-/tmp}/fluxray-cluster-$(id -u)}
WORKERS=2
CPUS_PER_WORKER=2
GCS_REDIS=0
PYTHON=${PYTHON:-python3}
GRACE_S=30  # for the nodes to stop their processes after SIGTERM, before SIGKILL
WORKER_GCS_RECONNECT_S=600  # with --gcs-redis: how long a worker's raylet waits for a lost GCS

command=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case $1 in
    --workers) WORKERS=${2:?}; shift 2 ;;
    --cpus-per-worker) CPUS_PER_WORKER=${2:?}; shift 2 ;;
    --gcs-redis) GCS_REDIS=1; shift ;;
    --state-dir) STATE_DIR=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done
case $STATE_DIR in /*) ;; *) STATE_DIR=$PWD/$STATE_DIR ;; esac  # Ray reads the token path from any cwd
STATE=$STATE_DIR/state.env      # KEY=VALUE lines, for `set -a; . state.env` and for tests
NODES=$STATE_DIR/nodes          # one "name pid" line per node
HEAD_ARGS=$STATE_DIR/head.args  # the head's `ray start` arguments, one a line, for restart-head
REDIS_PID=$STATE_DIR/redis.pid  # with --gcs-redis: the pid (and process group id) of redis-server
REDIS_DIR=$STATE_DIR/redis      # its config (which holds the password) and its data

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))'; }
state_get() { sed -n "s/^$1=//p" "$STATE" 2>/dev/null; }  # KEY: its value in state.env, or nothing

# A zombie counts as gone: it has exited and only waits for a parent (maybe PID 1) to reap it.
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${stat#Z}" = "$stat" ]
}

# A recorded pid is still one of ours only while it runs `ray start` or redis-server (a dead
# leader's pid can be reused once its process group is empty), or while it exits: a killed process
# that still frees its memory has no command line any more, which ps shows as "[name]".
is_node() { [[ $(ps -o args= -p "$1" 2>/dev/null) == @(*"ray start --block"*|\[*\]) ]]; }
is_redis() { [[ $(ps -o args= -p "$1" 2>/dev/null) == @(redis-server*|\[*\]) ]]; }

# The process groups that may still hold our processes: each recorded leader that is gone (a group
# outlives its leader while members remain, and its id is not reused by then) or still ours.
node_groups() {  # [PATTERN]: of every node, or of the nodes whose name matches (head, worker-*)
    [ -f "$NODES" ] || return 0
    local name pid
    while read -r name pid; do
        # shellcheck disable=SC2053  # a pattern on purpose
        [[ $name == ${1:-*} ]] || continue
        if ! alive "$pid" || is_node "$pid"; then echo "$pid"; fi
    done <"$NODES"
}
dead_node_groups() {  # PATTERN: the process groups of those nodes whose `ray start` is gone
    [ -f "$NODES" ] || return 0
    local name pid
    while read -r name pid; do
        # shellcheck disable=SC2053  # a pattern on purpose
        if [[ $name == $1 ]] && ! alive "$pid"; then echo "$pid"; fi
    done <"$NODES"
}
redis_group() {
    [ -f "$REDIS_PID" ] || return 0
    local pid
    pid=$(cat "$REDIS_PID")
    if ! alive "$pid" || is_redis "$pid"; then echo "$pid"; fi
}

# The pids of every live process of the given process groups and of their descendants.
group_pids() {  # GROUP-ID...
    [ $# -gt 0 ] || return 0
    ps -e -o pid=,ppid=,pgid=,stat= | awk -v groups="$*" '
        BEGIN { n = split(groups, g, " "); for (i = 1; i <= n; i++) leader[g[i]] = 1 }
        $4 ~ /^Z/ { next }
        { parent[$1] = $2; if ($3 in leader) mine[$1] = 1 }
        END {
            do { added = 0; for (p in parent) if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; added = 1 } } while (added)
            for (p in mine) print p
        }'
}
# shellcheck disable=SC2046  # one argument per group id
node_pids() { group_pids $(node_groups "${1:-*}"); }  # [PATTERN]
# shellcheck disable=SC2046
redis_pids() { group_pids $(redis_group); }
cluster_pids() {
    node_pids
    redis_pids
}
head_pid() { awk '$1 == "head" { print $2 }' "$NODES" 2>/dev/null; }

HEAD_PID=""
FAILED=""  # why the last start_node or start_redis failed

start_node() {  # NAME RAY-START-ARGS...: start one node in its own process group, wait until it is up
    local name=$1 log=$STATE_DIR/$1.log pid
    shift
    # In a script a background job is not a group leader, so setsid makes it one without forking:
    # $! is then the pid and the process group id of `ray start --block`.
    setsid ray start --block "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    echo "$name $pid" >>"$NODES"
    for _ in $(seq 240); do
        if grep -q "Ray runtime started" "$log"; then
            [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || abort "$name is not its own process group"
            return 0
        fi
        alive "$pid" || { FAILED="$name exited during start (log: $log)"; return 1; }
        # A head that dies after its start (a component failing) leaves workers waiting in vain.
        if [ -n "$HEAD_PID" ] && ! alive "$HEAD_PID"; then
            FAILED="the head exited while $name started (log: $STATE_DIR/head.log)"
            return 1
        fi
        sleep 0.5
    done
    FAILED="$name did not start in 120 s (log: $log)"
    return 1
}

REDIS_ADDRESS=""

start_redis() {  # the GCS's redis-server, in its own process group, up before returning
    local port log=$STATE_DIR/redis.log pid
    port=$(free_port)
    rm -rf "$REDIS_DIR"
    mkdir -p "$REDIS_DIR"
    # The password is in files only the user reads, never on redis-server's command line. Redis keeps
    # its default snapshots (dump.rdb), in the state dir.
    (
        umask 077
        secret >"$STATE_DIR/redis_password"
        printf '%s\n' "bind 127.0.0.1" "port $port" "protected-mode yes" \
            "requirepass $(cat "$STATE_DIR/redis_password")" "dir \"$REDIS_DIR\"" "daemonize no" 'logfile ""' \
            >"$REDIS_DIR/redis.conf"
    )
    setsid redis-server "$REDIS_DIR/redis.conf" >"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$REDIS_PID"
    for _ in $(seq 60); do
        if grep -q "Ready to accept connections" "$log"; then
            [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || abort "redis-server is not its own process group"
            REDIS_ADDRESS=127.0.0.1:$port
            return 0
        fi
        alive "$pid" || { FAILED="redis-server exited during start (log: $log)"; return 1; }
        sleep 0.5
    done
    FAILED="redis-server did not start in 30 s (log: $log)"
    return 1
}

port_taken() {  # whether a node log says a port chosen for it was taken in the meantime
    grep -qiE "failed to bind|address already in use|port .* (is )?(already )?in use" "$STATE_DIR"/*.log 2>/dev/null
}

abort() {  # a failed start leaves nothing running
    stop >&2
    die "$@"
}

start() {
    [ "$WORKERS" -ge 1 ] 2>/dev/null || die "--workers must be a positive number"
    command -v ray >/dev/null || die "ray is not on PATH (activate the environment: . .venv/bin/activate)"
    if [ "$GCS_REDIS" = 1 ] && ! command -v redis-server >/dev/null; then
        die "--gcs-redis needs redis-server on PATH (apt-get install redis-server; make install-test does)"
    fi
    if [ -n "$(cluster_pids)" ]; then
        die "a cluster recorded in $STATE_DIR is running; stop it first"
    fi
    mkdir -p "$STATE_DIR"
    # Ports are chosen free, but another process may take one before Ray binds it: then the
    # cluster is stopped and started again on new ports (three tries).
    local attempt
    for attempt in 1 2 3; do
        if start_once; then
            print_usage
            return 0
        fi
        echo "local_cluster.sh: $FAILED" >&2
        stop >/dev/null 2>&1 || true
        [ "$attempt" -lt 3 ] && port_taken || break
        echo "local_cluster.sh: a port was taken meanwhile; starting again on new ports" >&2
    done
    die "$FAILED"
}

export_node_env() {  # what every node's `ray start` needs in its environment
    # Ray reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH: drop one inherited from another cluster
    # (and another cluster's Redis settings).
    unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_REDIS_ADDRESS RAY_external_storage_namespace
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token RAY_USAGE_STATS_ENABLED=0
    # On SIGTERM a node first drains (up to 30 s) so Serve can move its replicas to other nodes; `stop`
    # ends every node at once, so there is nowhere to move them: stop at once.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
    # Serve replicas and job actors import deployments/ and jobs/ from the repository root.
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
}

start_head() {  # the head node from head.args, its GCS in Redis when the cluster has one
    local args redis
    mapfile -t args <"$HEAD_ARGS"
    redis=$(state_get FLUXRAY_REDIS_ADDRESS)
    if [ -n "$redis" ]; then
        # As Ray documents for `ray start` with an external Redis (and KubeRay does): the address in
        # the environment, the password as a flag (Ray hands it on to the GCS's command line).
        RAY_REDIS_ADDRESS=$redis RAY_external_storage_namespace=$(state_get FLUXRAY_GCS_STORAGE_NAMESPACE) \
            start_node head "${args[@]}" --redis-password="$(cat "$(state_get FLUXRAY_REDIS_PASSWORD_PATH)")"
    else
        start_node head "${args[@]}"
    fi
}

start_once() {
    rm -f "$NODES" "$STATE" "$HEAD_ARGS" "$REDIS_PID" "$STATE_DIR"/*.log "$STATE_DIR"/*.log.1
    HEAD_PID=""
    REDIS_ADDRESS=""
    # A short temp dir: Ray's Unix socket paths under it must stay below 108 bytes.
    local temp_dir
    temp_dir=$(mktemp -d /tmp/fxr-XXXXXX)
    gcs_port=$(free_port)
    dashboard_port=$(free_port)
    (umask 077 && secret >"$STATE_DIR/auth_token")
    cat >"$STATE" <<EOF
RAY_ADDRESS=127.0.0.1:$gcs_port
RAY_DASHBOARD=http://127.0.0.1:$dashboard_port
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
RAY_TEMP_DIR=$temp_dir
EOF
    if [ "$GCS_REDIS" = 1 ]; then
        start_redis || return 1
        # Not RAY_-prefixed: a client that sources state.env must not take them for its own settings.
        # The namespace keeps this cluster's keys apart from another's in the same Redis (KubeRay's
        # default is the RayCluster's UID).
        cat >>"$STATE" <<EOF
FLUXRAY_REDIS_ADDRESS=$REDIS_ADDRESS
FLUXRAY_REDIS_PASSWORD_PATH=$STATE_DIR/redis_password
FLUXRAY_GCS_STORAGE_NAMESPACE=fluxray-$(basename "$temp_dir")
EOF
    fi
    export_node_env
    # Every port is explicit or random: the defaults (6379, 8265, 10001, 52365) may belong to another cluster.
    local common=(--node-ip-address=127.0.0.1 --disable-usage-stats)
    printf '%s\n' --head "${common[@]}" --node-name=head --num-cpus=0 --temp-dir="$temp_dir" \
        --port="$gcs_port" --dashboard-port="$dashboard_port" --include-dashboard=true \
        --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" >"$HEAD_ARGS"
    start_head || return 1
    HEAD_PID=$(head_pid)
    # With the GCS in Redis, a worker outlives a head crash while a new head comes up (KubeRay sets
    # the same on its worker pods); without it, a worker has nothing to wait for.
    if [ "$GCS_REDIS" = 1 ]; then export RAY_gcs_rpc_server_reconnect_timeout_s=$WORKER_GCS_RECONNECT_S; fi
    local serve_port
    for i in $(seq "$WORKERS"); do
        # Each worker's Serve proxy gets a port of its own (the head's keeps the serve config's), so a
        # client can go through one node's proxy: on one machine they would otherwise share one port.
        serve_port=$(free_port)
        echo "FLUXRAY_WORKER_${i}_SERVE_PORT=$serve_port" >>"$STATE"
        RAY_SERVE_WORKER_PROXY_HTTP_PORT=$serve_port start_node "worker-$i" --address="127.0.0.1:$gcs_port" \
            "${common[@]}" --node-name="worker-$i" --num-cpus="$CPUS_PER_WORKER" \
            --dashboard-agent-listen-port="$(free_port)" || return 1
    done
    # Up only if the head survived its workers' start too.
    alive "$HEAD_PID" || { FAILED="the head exited (log: $STATE_DIR/head.log)"; return 1; }
}

print_usage() {
    local redis=""
    if [ "$GCS_REDIS" = 1 ]; then redis=", GCS state in Redis at $REDIS_ADDRESS"; fi
    cat <<EOF
Ray cluster up: head (0 CPUs) + $WORKERS worker(s) x $CPUS_PER_WORKER CPUs, token auth$redis. Its state: $STATE_DIR
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token   # or: set -a; . $STATE; set +a
  ray status --address 127.0.0.1:$gcs_port
  serve deploy deployments/configs/local.yaml --address http://127.0.0.1:$dashboard_port
  # Serve's HTTP proxies: the head's on the serve config's port, worker-i's on FLUXRAY_WORKER_<i>_SERVE_PORT
  ray job submit --address http://127.0.0.1:$dashboard_port --working-dir . -- \\
      python -m jobs.generate --input examples/prompts.jsonl --output out/job
  $0 stop --state-dir $STATE_DIR
EOF
}

status() {
    [ -f "$NODES" ] || { echo "no cluster recorded in $STATE_DIR"; return 0; }
    local name pid
    while read -r name pid; do
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done <"$NODES"
    if [ -f "$REDIS_PID" ]; then
        pid=$(cat "$REDIS_PID")
        if alive "$pid"; then echo "redis: running (pid $pid)"; else echo "redis: stopped"; fi
    fi
    grep -E '^(RAY_(ADDRESS|DASHBOARD)|FLUXRAY_REDIS_ADDRESS)=' "$STATE" || true
}

# Waits up to GRACE_S until PIDS, and what `LIST-FUNCTION ARGUMENT` lists, are gone; then SIGKILL.
end_within_grace() {  # WHAT PIDS LIST-FUNCTION ARGUMENT
    local what=$1 pids=$2 list=$3 arg=$4
    for _ in $(seq $((GRACE_S * 2))); do
        pids=$(for p in $pids $("$list" "$arg"); do if alive "$p"; then echo "$p"; fi; done | sort -u)
        [ -z "$pids" ] && return 0
        sleep 0.5
    done
    echo "killing what is left of the $what after ${GRACE_S}s: ${pids//$'\n'/ }" >&2
    # shellcheck disable=SC2086  # one argument per pid
    kill -KILL $pids 2>/dev/null || true
}

stop() {
    [ -f "$NODES" ] || [ -f "$REDIS_PID" ] || { echo "no cluster recorded in $STATE_DIR"; return 0; }
    local pids name pid nodes
    # Each node through its `ray start --block`, which stops the processes it started: the workers
    # first, while the GCS still answers them (with --gcs-redis they would wait for a lost GCS), then
    # the head, then Redis, so that no GCS loses its store while it runs.
    for nodes in "worker-*" head; do
        pids=$(node_pids "$nodes")
        if [ -f "$NODES" ]; then
            while read -r name pid; do
                # shellcheck disable=SC2053  # a pattern on purpose
                if [[ $name == $nodes ]] && is_node "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
            done <"$NODES"
        fi
        # What a node that died (its `ray start` gone) left behind has nobody else to stop it.
        # shellcheck disable=SC2046  # one argument per pid
        kill -TERM $(group_pids $(dead_node_groups "$nodes")) 2>/dev/null || true
        end_within_grace "nodes ($nodes)" "$pids" node_pids "$nodes"
    done
    pids=$(redis_pids)
    pid=$(cat "$REDIS_PID" 2>/dev/null || true)
    if [ -n "$pid" ] && is_redis "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    end_within_grace redis-server "$pids" redis_pids ""
    local temp_dir
    temp_dir=$(state_get RAY_TEMP_DIR)
    case $temp_dir in /tmp/fxr-?*) rm -rf "$temp_dir" ;; esac  # only the kind of dir that start made
    rm -rf "$REDIS_DIR"  # its config holds the password, its dump this cluster's GCS tables
    rm -f "$NODES" "$STATE" "$HEAD_ARGS" "$REDIS_PID" "$STATE_DIR/auth_token" "$STATE_DIR/redis_password"
    echo "stopped the cluster recorded in $STATE_DIR (node logs kept there)"
}

kill_head() {  # a crash of the head node: SIGKILL to each of its processes, nothing else touched
    [ -f "$NODES" ] || die "no cluster recorded in $STATE_DIR"
    local head pids all=""
    head=$(head_pid)
    # The head's process group, by its id from here on (a killed leader soon looks like no node at
    # all); a leader that exited may have left members behind, and those go too.
    if [ -n "$head" ] && { ! alive "$head" || is_node "$head"; }; then pids=$(group_pids "$head"); else pids=""; fi
    [ -n "$pids" ] || die "the head recorded in $STATE_DIR is not running"
    # Stopped first, so that none forks or exits while the rest are found (the children of an exited
    # parent would leave the tree); what joined the group or the tree meanwhile is stopped in turn.
    for _ in $(seq 20); do
        # shellcheck disable=SC2086  # one argument per pid
        kill -STOP $pids 2>/dev/null || true
        # shellcheck disable=SC2086  # one pid a word
        all=$(printf '%s\n' $all $pids | sort -u)
        pids=$(group_pids "$head" | grep -vxF "$all" || true)
        [ -z "$pids" ] && break
    done
    # shellcheck disable=SC2086
    kill -KILL $all 2>/dev/null || true
    # Gone, not only signalled: a big process takes a while to free its memory.
    for _ in $(seq 120); do
        [ -z "$(group_pids "$head")" ] && break
        sleep 0.25
    done
    [ -z "$(group_pids "$head")" ] || die "processes of the head outlived SIGKILL by 30 s: $(group_pids "$head" | tr '\n' ' ')"
    echo "killed the head's $(echo "$all" | wc -w) processes (SIGKILL); the workers and Redis, if any, still run"
}

restart_head() {  # a new head on the same ports, temp dir, token and Redis, up before returning
    if [ ! -f "$STATE" ] || [ ! -f "$NODES" ]; then die "no cluster recorded in $STATE_DIR"; fi
    [ -n "$(state_get FLUXRAY_REDIS_ADDRESS)" ] ||
        die "restart-head needs a cluster started with --gcs-redis: without GCS fault tolerance a new head cannot take the old workers back"
    [ -z "$(node_pids head)" ] || die "processes of the head still run (process group $(head_pid)); kill-head first"
    local redis
    redis=$(cat "$REDIS_PID" 2>/dev/null || true)
    if [ -z "$redis" ] || ! alive "$redis" || ! is_redis "$redis"; then
        die "the cluster's redis-server is not running (log: $STATE_DIR/redis.log)"
    fi
    local t0
    t0=$(date +%s%N)
    export_node_env
    sed -i '/^head /d' "$NODES"
    if [ -f "$STATE_DIR/head.log" ]; then mv "$STATE_DIR/head.log" "$STATE_DIR/head.log.1"; fi
    # `ray start --head` refuses to start where the temp dir's marker of the last head's address
    # names a GCS that local processes still point to (--gcs-address): the workers on this machine
    # do, though that GCS is dead. The marker is the killed head's; the new head writes it again.
    rm -f "$(state_get RAY_TEMP_DIR)/ray_current_cluster"
    if ! start_head; then
        # shellcheck disable=SC2046  # one argument per pid
        kill -KILL $(node_pids head) 2>/dev/null || true
        die "$FAILED"
    fi
    echo "head restarted (pid $(head_pid)) in $((($(date +%s%N) - t0) / 1000000)) ms; the killed head's log: $STATE_DIR/head.log.1"
}

case $command in
start) start ;;
status) status ;;
stop) stop ;;
kill-head) kill_head ;;
restart-head) restart_head ;;
-h | --help) usage ;;
*) usage; exit 2 ;;
esac
