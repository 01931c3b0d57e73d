#!/usr/bin/env bash
# Build every component of the test cluster from its upstream Go module at the pinned release (versions.env),
# and the images of the in-cluster ones from the Debian base image, into the cache. What is already built at
# the pinned version is reused, so a second run takes seconds.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

mkdir -p "$BIN" "$CACHE/src" "$CACHE/images"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOWORK=off

# Copy an upstream module out of the module cache into a writable tree and point its local `replace` lines
# (a monorepo's sibling modules, absent from the module zip) at the same release of those modules.
fetch_module() {
  local module="$1" version="$2" sibling_version="$3" dest="$4"
  [[ -f "$dest/.fetched" ]] && return 0
  local dir
  dir="$(cd /tmp && go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$dir" ]] || die "go mod download $module@$version gave no source tree"
  rm -rf "$dest"
  cp -r "$dir" "$dest"
  chmod -R u+w "$dest"
  rm -rf "$dest/vendor"
  # One edit per local replace: the sibling's release when the module requires it, else the line goes.
  (cd "$dest" && go mod edit -json | python3 -c '
import json, sys
mod = json.load(sys.stdin)
required = {r["Path"] for r in mod.get("Require") or []}
for r in mod.get("Replace") or []:
    old = r["Old"]["Path"]
    if r["New"]["Path"].startswith((".", "/")):
        print(f"-replace={old}={old}@" + sys.argv[1] if old in required else f"-dropreplace={old}")
' "$sibling_version" | xargs -r go mod edit)
  touch "$dest/.fetched"
}

# go_component NAME MODULE VERSION SIBLING_VERSION LDFLAGS PACKAGE...
go_component() {
  local name="$1" module="$2" version="$3" sibling="$4" ldflags="$5"
  shift 5
  local stamp="$BIN/.$name-$version"
  if [[ -f "$stamp" ]]; then
    log "$name $version: built"
    return 0
  fi
  local src="$CACHE/src/$name-$version" start=$SECONDS
  log "$name $version: building $* from $module"
  fetch_module "$module" "$version" "$sibling" "$src"
  if declare -F "prepare_$name" >/dev/null; then "prepare_$name" "$src"; fi
  mkdir -p "$BIN/$name"
  (cd "$src" && go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN/$name/" "$@")
  touch "$stamp"
  log "$name $version: built in $((SECONDS - start)) s"
}

k8s_ldflags() {
  local v="$KUBERNETES_VERSION" minor
  minor="$(cut -d. -f2 <<<"$v")"
  local x
  for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean ' \
      "$x" "$v" "$x" "$x" "$minor" "$x"
  done
}

# CoreDNS with the plugins of the Corefile that the Kubernetes module's DNS add-on ships, and no others (the
# cloud DNS backends pull in whole cloud SDKs): upstream's way to build a custom CoreDNS, a shorter plugin.cfg and
# its generator. The plugins keep their upstream order, which is the order they run in.
COREDNS_PLUGINS="errors health ready kubernetes prometheus forward cache loop reload loadbalance"
prepare_coredns() {
  local src="$1" keep
  keep="$(tr ' ' '|' <<<"$COREDNS_PLUGINS")"
  grep -E "^($keep):" "$src/plugin.cfg" >"$src/plugin.cfg.new"
  [[ "$(wc -l <"$src/plugin.cfg.new")" -eq "$(wc -w <<<"$COREDNS_PLUGINS")" ]] ||
    die "CoreDNS $COREDNS_VERSION: plugin.cfg lacks one of: $COREDNS_PLUGINS"
  mv "$src/plugin.cfg.new" "$src/plugin.cfg"
  (cd "$src" && go run directives_generate.go)
}

total=$SECONDS
go_component kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION" "$KUBERNETES_STAGING_VERSION" "$(k8s_ldflags)" \
  ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler ./cmd/kubelet ./cmd/kube-proxy
go_component etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" "" .
[[ -x "$BIN/etcd/server" ]] && mv -f "$BIN/etcd/server" "$BIN/etcd/etcd"
go_component coredns github.com/coredns/coredns "$COREDNS_VERSION" "" "" .
go_component keda github.com/kedacore/keda/v2 "$KEDA_VERSION" "" \
  "-X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}" ./cmd/operator ./cmd/adapter ./cmd/webhooks
go_component keda-http-add-on github.com/kedacore/http-add-on "$KEDA_HTTP_ADDON_VERSION" "" "" \
  ./operator ./interceptor ./scaler
go_component traefik github.com/traefik/traefik/v3 "$TRAEFIK_VERSION" "" \
  "-X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" ./cmd/traefik

# The pod sandbox ("pause") process, from the C source in the Kubernetes module, linked statically.
pause_src="$CACHE/src/kubernetes-$KUBERNETES_VERSION/build/pause/linux/pause.c"
if [[ ! -x "$BIN/pause" || "$pause_src" -nt "$BIN/pause" ]]; then
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-llmpods" -o "$BIN/pause" "$pause_src"
fi
log "binaries ready in $((SECONDS - total)) s: $BIN"

"$CLUSTER_TOOLS/images.sh"
