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
COREDNS_BIN="$CACHE/coredns/$COREDNS_VERSION/bin"
ETCD_BIN="$CACHE/etcd/$ETCD_VERSION/bin"
KWOK_BIN="$CACHE/kwok/$KWOK_VERSION/bin"
KWOK_CRD_DIR="$CACHE/kwok/$KWOK_VERSION/crd"
KUBECTL="$K8S_BIN/kubectl"

API_HOST=127.0.0.1
API_PORT=6443
API_ADVERTISE=172.18.0.2
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16
# IPv6 halves of a dual-stack cluster (NETBOOT_IP_FAMILY=dual): ULA ranges that
# exist only inside podnet's namespaces.
SERVICE_CIDR6=fd00:10:96::/112
POD_CIDR6=fd00:10:244::/56
NODE_CIDR_MASK6=64
# What kubeadm printed for the add-ons (tests put kube-proxy back from it).
ADDONS="$STATE/addons"

# Ports every component listens on (all on 127.0.0.1); down and the
# leaves-nothing-behind test check they are free again.
ETCD_PORT=2379
ETCD_PEER_PORT=2380
KCM_PORT=10257
SCHED_PORT=10259
KWOK_PORT=10247
CLUSTER_PORTS=("$ETCD_PORT" "$ETCD_PEER_PORT" "$API_PORT" "$KCM_PORT" "$SCHED_PORT" "$KWOK_PORT")

# podnet's HTTP CONNECT proxy for the API server's egress to the cluster
# (kubelets, pods, Services): the only way the API server reaches in.
EGRESS_SOCKET="$STATE/egress.sock"

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

# start_time PID: the process's start time (clock ticks since boot, field 22
# of /proc/PID/stat); with the PID it names one process for good.
start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }" # drop "pid (comm) ": comm may hold spaces
  awk '{ print $20 }' <<<"$stat"
}

# alive NAME: true if NAME's recorded PID is still the process up started:
# same PID and same start time (a recycled PID has another start time; a
# moved or rebuilt binary does not matter), and not a zombie waiting to be
# reaped.
alive() {
  local pid want stat
  pid="$(pid_of "$1")"
  [[ -n "$pid" ]] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]] || return 1
  want="$(sed -n 3p "$STATE/pids/$1.pid")"
  [[ -z "$want" || "$(awk '{ print $20 }' <<<"$stat")" == "$want" ]]
}

# start NAME BINARY ARGS...: runs BINARY in its own session, detached from
# this shell, output to logs/NAME.log; records "PID\nBINARY\nSTART_TIME" in
# pids/NAME.pid.
start() {
  local name="$1" bin="$2"; shift 2
  [[ -x "$bin" ]] || die "$name: binary $bin missing (run tests/cluster/build)"
  mkdir -p "$STATE/logs" "$STATE/pids"
  # In a non-interactive shell a background job is not a process-group
  # leader, so setsid execs in place and $! is the component's own PID. The
  # start time is set at fork, so it is right even before the exec.
  setsid nohup "$bin" "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  printf '%s\n%s\n%s\n' "$pid" "$(readlink -f "$bin")" "$(start_time "$pid" || true)" >"$STATE/pids/$name.pid"
  say "$name: started (pid $pid, log $STATE/logs/$name.log)"
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

# node_ip6 I: the IPv6 InternalIP of node-I in a dual-stack cluster: node_ip's
# last two bytes under fd00:172:18::/64 (172.18.1.1 -> fd00:172:18::1:1), as
# netboot_harness::names::node_ip6 derives it.
node_ip6() {
  local i="$1"
  printf 'fd00:172:18::%d:%d\n' $((1 + i / 254)) $((1 + i % 254))
}
