#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start`
# process with its own node name and CPUs, token authentication on. The shape of the KubeRay and VM
# clusters (a head with num-cpus 0, workers that run the replicas and actors), to try `serve deploy`
# and `ray job submit` across nodes without Kubernetes.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-worker C] [--state-dir DIR]
#   cluster/local_cluster.sh status [--state-dir DIR]
#   cluster/local_cluster.sh stop [--state-dir DIR]
#
# It stops exactly what it started and never another Ray cluster on the machine, which `ray stop`
# would kill too (it kills every Ray process of the user). Each node runs `ray start --block` as the
# leader of a new process group (setsid), whose pid goes into the state dir; `stop` signals those
# processes (on SIGTERM, `ray start --block` stops the processes it started) and waits until every
# process of their groups, and every descendant, is gone, killing what is left after a grace period.
# The head gets a fresh --temp-dir, which workers inherit, so this cluster's sockets, logs and
# session files stay out of /tmp/ray, where other clusters and `address="auto"` look.
set -euo pipefail

usage() { sed -n '7,9s/^#   //p' "$0"; }
die() {
    echo "local_cluster.sh: $*" >&2
    exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${FLUXRAY_CLUSTER_DIR:-${TMPDIR:-/tmp}/fluxray-cluster-$(id -u)}
WORKERS=2
CPUS_PER_WORKER=2
PYTHON=${PYTHON:-python3}
GRACE_S=30  # for the nodes to stop their processes after SIGTERM, before SIGKILL

command=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case $1 in
    --workers) WORKERS=${2:?}; shift 2 ;;
    --cpus-per-worker) CPUS_PER_WORKER=${2:?}; shift 2 ;;
    --state-dir) STATE_DIR=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done
case $STATE_DIR in /*) ;; *) STATE_DIR=$PWD/$STATE_DIR ;; esac  # Ray reads the token path from any cwd
STATE=$STATE_DIR/state.env  # KEY=VALUE lines, for `set -a; . state.env` and for tests
NODES=$STATE_DIR/nodes      # one "name pid" line per node

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A zombie counts as gone: it has exited and only waits for a parent (maybe PID 1) to reap it.
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${stat#Z}" = "$stat" ]
}

# A recorded pid is still one of our nodes only while it runs `ray start` (a dead node's pid can be
# reused once its process group is empty).
is_node() { [[ $(ps -o args= -p "$1" 2>/dev/null) == *"ray start --block"* ]]; }

# The pids of every live process of the recorded nodes: members of their process groups (a group
# outlives its leader while members remain, and its id is not reused by then) and their descendants.
cluster_pids() {
    [ -f "$NODES" ] || return 0
    local groups="" name pid
    while read -r name pid; do
        if ! alive "$pid" || is_node "$pid"; then groups="$groups $pid"; fi
    done <"$NODES"
    ps -e -o pid=,ppid=,pgid=,stat= | awk -v groups="$groups" '
        BEGIN { n = split(groups, g, " "); for (i = 1; i <= n; i++) leader[g[i]] = 1 }
        $4 ~ /^Z/ { next }
        { parent[$1] = $2; if ($3 in leader) mine[$1] = 1 }
        END {
            do { added = 0; for (p in parent) if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; added = 1 } } while (added)
            for (p in mine) print p
        }'
}

HEAD_PID=""
FAILED=""  # why the last start_node failed

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

start_once() {
    rm -f "$NODES" "$STATE" "$STATE_DIR"/*.log
    HEAD_PID=""
    # A short temp dir: Ray's Unix socket paths under it must stay below 108 bytes.
    local temp_dir
    temp_dir=$(mktemp -d /tmp/fxr-XXXXXX)
    gcs_port=$(free_port)
    dashboard_port=$(free_port)
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE_DIR/auth_token")
    cat >"$STATE" <<EOF
RAY_ADDRESS=127.0.0.1:$gcs_port
RAY_DASHBOARD=http://127.0.0.1:$dashboard_port
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
RAY_TEMP_DIR=$temp_dir
EOF
    # Ray reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH: drop one inherited from another cluster.
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token RAY_USAGE_STATS_ENABLED=0
    # On SIGTERM a node first drains (up to 30 s) so Serve can move its replicas to other nodes; `stop`
    # ends every node at once, so there is nowhere to move them: stop at once.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
    # Serve replicas and job actors import deployments/ and jobs/ from the repository root.
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    # Every port is explicit or random: the defaults (6379, 8265, 10001, 52365) may belong to another cluster.
    local common=(--node-ip-address=127.0.0.1 --disable-usage-stats)
    start_node head --head "${common[@]}" --node-name=head --num-cpus=0 --temp-dir="$temp_dir" \
        --port="$gcs_port" --dashboard-port="$dashboard_port" --include-dashboard=true \
        --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$(free_port)" || return 1
    HEAD_PID=$(awk '$1 == "head" { print $2 }' "$NODES")
    for i in $(seq "$WORKERS"); do
        start_node "worker-$i" --address="127.0.0.1:$gcs_port" "${common[@]}" --node-name="worker-$i" \
            --num-cpus="$CPUS_PER_WORKER" --dashboard-agent-listen-port="$(free_port)" || return 1
    done
    # Up only if the head survived its workers' start too.
    alive "$HEAD_PID" || { FAILED="the head exited (log: $STATE_DIR/head.log)"; return 1; }
}

print_usage() {
    cat <<EOF
Ray cluster up: head (0 CPUs) + $WORKERS worker(s) x $CPUS_PER_WORKER CPUs, token auth. Its state: $STATE_DIR
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token   # or: set -a; . $STATE; set +a
  ray status --address 127.0.0.1:$gcs_port
  serve deploy deployments/configs/local.yaml --address http://127.0.0.1:$dashboard_port
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
    grep -E '^RAY_(ADDRESS|DASHBOARD)=' "$STATE" || true
}

stop() {
    [ -f "$NODES" ] || { echo "no cluster recorded in $STATE_DIR"; return 0; }
    local pids name pid
    pids=$(cluster_pids)
    # Each node through its `ray start --block`, which stops the processes it started.
    tac "$NODES" | while read -r name pid; do
        if is_node "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq $((GRACE_S * 2))); do
        pids=$(for p in $pids $(cluster_pids); do if alive "$p"; then echo "$p"; fi; done | sort -u)
        [ -z "$pids" ] && break
        sleep 0.5
    done
    if [ -n "$pids" ]; then
        echo "killing what is left after ${GRACE_S}s: ${pids//$'\n'/ }" >&2
        # shellcheck disable=SC2086  # one argument per pid
        kill -KILL $pids 2>/dev/null || true
    fi
    local temp_dir
    temp_dir=$(sed -n 's/^RAY_TEMP_DIR=//p' "$STATE")
    case $temp_dir in /tmp/fxr-?*) rm -rf "$temp_dir" ;; esac  # only the kind of dir that start made
    rm -f "$NODES" "$STATE" "$STATE_DIR/auth_token"
    echo "stopped the cluster recorded in $STATE_DIR (node logs kept there)"
}

case $command in
start) start ;;
status) status ;;
stop) stop ;;
-h | --help) usage ;;
*) usage; exit 2 ;;
esac
