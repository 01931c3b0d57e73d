# Shared settings of the cluster scripts: sourced, not run.
# shellcheck shell=bash
CLUSTER_TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$CLUSTER_TOOLS/versions.env"
# What is built once and reused by every start: binaries, upstream sources, image archives.
CACHE="${LLMPODS_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmpods-cluster}"
# What a running cluster owns: removed by `make cluster-down`.
DATA="${LLMPODS_CLUSTER_DATA:-/var/lib/llmpods-cluster}"
RUN="${LLMPODS_CLUSTER_RUN:-/run/llmpods-cluster}"
BIN="$CACHE/bin"
KUBECONFIG_PATH="$DATA/admin.kubeconfig"
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24
CLUSTER_DOMAIN=cluster.local
BRIDGE=llmpods0
INGRESS_NODE_PORT="${LLMPODS_CLUSTER_INGRESS_PORT:-30080}"
REGISTRY="${LLMPODS_CLUSTER_REGISTRY:-127.0.0.1:5100}"
IMAGE_PREFIX=llmpods.local/cluster

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'cluster: %s\n' "$*" >&2; exit 1; }

# The address pods and the node use for each other: the source address of the default route.
node_ip() {
  ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -1
}
