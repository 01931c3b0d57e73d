#!/usr/bin/env bash
# Remove the test cluster and everything it started: containers, processes, mounts, network namespaces, the
# bridge, iptables rules and its data. The cache of built binaries and images stays. Prints what is left, if
# anything, and fails then.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

[[ $EUID -eq 0 ]] || die "run as root"
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)

stop() {
  local name="$1" pid
  [[ -f "$RUN/$name.pid" ]] || return 0
  pid="$(cat "$RUN/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}

# The kubelet first, so that it restarts nothing; then every container while containerd still answers.
stop kubelet
if [[ -S "$CONTAINERD_SOCK" ]] && "${CTR[@]}" version >/dev/null 2>&1; then
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
    "${CTR[@]}" tasks kill --all --signal SIGKILL "$task" >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 20); do
    [[ -z "$("${CTR[@]}" tasks ls 2>/dev/null | awk 'NR > 1 && $3 != "STOPPED"')" ]] && break
    sleep 0.5
  done
  for task in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete "$task" >/dev/null 2>&1 || true; done
fi
for name in kube-proxy kube-scheduler kube-controller-manager kube-apiserver containerd registry etcd; do
  stop "$name"
done
# Shims outlive containerd by design; this cluster's know its socket.
pkill -9 -f -- "-address $CONTAINERD_SOCK" 2>/dev/null || true

# Rules: kube-proxy removes its own; the CNI plugins' chains (CNI-*) and anything left by either go here.
[[ -x "$BIN/kubernetes/kube-proxy" ]] && "$BIN/kubernetes/kube-proxy" --cleanup >/dev/null 2>&1 || true
drop_chains() {
  local tool="$1" table rule chain
  for table in nat filter mangle raw; do
    "$tool-save" -t "$table" >/dev/null 2>&1 || continue
    while read -r rule; do
      eval "$tool -t $table ${rule/#-A/-D}" 2>/dev/null || true
    done < <("$tool-save" -t "$table" | grep -E '^-A .*(CNI-|KUBE-|LLMPODS-)' || true)
    for chain in $("$tool-save" -t "$table" | sed -nE 's/^:((CNI|KUBE|LLMPODS)-[^ ]+) .*/\1/p'); do
      "$tool" -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $("$tool-save" -t "$table" | sed -nE 's/^:((CNI|KUBE|LLMPODS)-[^ ]+) .*/\1/p'); do
      "$tool" -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}
drop_chains iptables
command -v ip6tables >/dev/null && drop_chains ip6tables

# Mounts (pod volumes, container root filesystems, sandbox network namespaces), deepest first.
for _ in 1 2 3; do
  for target in $(findmnt -rn -o TARGET | grep -E "^($DATA|$RUN)(/|$)|^/run/netns/cni-|^/var/run/netns/cni-" | sort -r); do
    umount -l "$target" 2>/dev/null || true
  done
done
for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
rm -rf "$DATA" "$RUN"

# What is left is a failure: say what.
left=()
ours() {
  local pid exe
  for pid in $(pgrep -f -- "$CONTAINERD_SOCK|$DATA/" 2>/dev/null); do echo "$pid"; done
  for exe in /proc/[0-9]*/exe; do
    if [[ "$(readlink "$exe" 2>/dev/null)" == "$BIN/"* ]]; then
      pid="${exe#/proc/}"
      echo "${pid%/exe}"
    fi
  done
}
procs="$(ours | sort -u | tr '\n' ' ')"
[[ -n "${procs// /}" ]] && left+=("processes $procs")
findmnt -rn -o TARGET | grep -qE "^($DATA|$RUN)(/|$)|/netns/cni-" && left+=("mounts")
ip link show "$BRIDGE" >/dev/null 2>&1 && left+=("interface $BRIDGE")
iptables-save | grep -qE '^:(CNI|KUBE|LLMPODS)-' && left+=("iptables chains: $(iptables-save | grep -oE '^:(CNI|KUBE|LLMPODS)-[^ ]+' | tr '\n' ' ')")
if ((${#left[@]})); then
  printf 'cluster: left behind: %s\n' "${left[@]}" >&2
  exit 1
fi
log "cluster removed (cache kept in $CACHE)"
