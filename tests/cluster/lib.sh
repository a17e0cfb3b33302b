# Shared by tests/cluster/{up,down,status,leaves-nothing-behind}; sourced, not run.
# Paths and names follow docs/contracts.md ("Local cluster").
# shellcheck shell=bash
# Variables here are used by the scripts that source this file.
# shellcheck disable=SC2034

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"
# shellcheck source=versions.env
source "$CLUSTER_DIR/versions.env"

STATE="${NETBOOT_STATE_DIR:-/tmp/netboot-local}"
CACHE="${NETBOOT_CACHE:-$HOME/.cache/netboot}"
K8S_BIN="$CACHE/k8s/$K8S_VERSION/bin"
ETCD_BIN="$CACHE/etcd/$ETCD_VERSION/bin"
KWOK_BIN="$CACHE/kwok/$KWOK_VERSION/bin"
KUBECTL="$K8S_BIN/kubectl"

API_HOST=127.0.0.1
API_PORT=6443
API_ADVERTISE=172.18.0.2
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16

# Ports every component listens on (all on 127.0.0.1); down and the
# leaves-nothing-behind test check they are free again.
ETCD_PORT=2379
ETCD_PEER_PORT=2380
KCM_PORT=10257
SCHED_PORT=10259
KWOK_PORT=10247
CLUSTER_PORTS=("$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT" "$KCM_PORT" "$SCHED_PORT" "$KWOK_PORT")

# Start order; down stops in the reverse order, podnet first.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok podnet)

# Leftovers of podnet that down sweeps by exact prefix (contracts.md).
NETNS_PREFIX="nb-"
CGROUP_ROOT="/sys/fs/cgroup/unified/netboot-local"
BPFFS_ROOT="/sys/fs/bpf/netboot-local"

_t0=$SECONDS
say() { printf '[%s %4ds] %s\n' "${LOG_TAG:-cluster}" "$((SECONDS - _t0))" "$*"; }
warn() { printf '[%s] warning: %s\n' "${LOG_TAG:-cluster}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${LOG_TAG:-cluster}" "$*" >&2; exit 1; }

# pid_of NAME: prints the recorded PID of component NAME (empty if none).
pid_of() {
  local f="$STATE/pids/$1.pid"
  if [[ -f "$f" ]]; then head -n1 "$f"; fi
}

# alive NAME: true if NAME's recorded PID still runs the binary it was
# started with (guards against a recycled PID).
alive() {
  local pid exe want
  pid="$(pid_of "$1")"
  [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
  want="$(sed -n 2p "$STATE/pids/$1.pid")"
  [[ -z "$want" ]] && return 0
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  # A rebuilt binary shows as "<path> (deleted)".
  [[ "${exe% (deleted)}" == "$want" ]]
}

# start NAME BINARY ARGS...: runs BINARY in its own session, detached from
# this shell, output to logs/NAME.log; records "PID\nBINARY" in pids/NAME.pid.
start() {
  local name="$1" bin="$2"; shift 2
  [[ -x "$bin" ]] || die "$name: binary $bin missing (run tests/cluster/build)"
  mkdir -p "$STATE/logs" "$STATE/pids"
  # In a non-interactive shell a background job is not a process-group
  # leader, so setsid execs in place and $! is the component's own PID.
  setsid nohup "$bin" "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  printf '%s\n%s\n' "$!" "$(readlink -f "$bin")" >"$STATE/pids/$name.pid"
  say "$name: started (pid $!, log $STATE/logs/$name.log)"
}

# tail_log NAME: the last 30 lines of NAME's log, for error messages.
tail_log() {
  local f="$STATE/logs/$1.log"
  if [[ -f "$f" ]]; then
    printf -- '--- last 30 lines of %s ---\n' "$f" >&2
    tail -n 30 "$f" >&2
    printf -- '--- end of %s ---\n' "$f" >&2
  fi
}

# port_listener PORT: prints what listens on 127.0.0.1/0.0.0.0:PORT (TCP), empty if free.
port_listener() {
  ss -Hltnp "sport = :$1" 2>/dev/null || true
}

kubectl_() { "$KUBECTL" --kubeconfig "$STATE/kubeconfig" "$@"; }

# node_ip I: InternalIP of node-I: 172.18.1.1 … 172.18.1.254, then 172.18.2.1 ….
node_ip() {
  local i="$1"
  printf '172.18.%d.%d\n' $((1 + i / 254)) $((1 + i % 254))
}
