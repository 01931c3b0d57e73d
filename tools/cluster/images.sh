#!/usr/bin/env bash
# Images of the components that run inside the cluster, built from the Debian base image (no registry is
# reachable), each holding one binary from build.sh; saved as one archive (the base layer once) that the
# node's containerd imports.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

command -v docker >/dev/null || die "docker is needed to build the component images"
docker image inspect debian:bookworm-slim >/dev/null 2>&1 \
  || die "the base image debian:bookworm-slim is missing (.ci/base-image.sh makes it)"

# NAME TAG BINARY USER (CoreDNS binds port 53: it runs as root with every capability dropped but
# NET_BIND_SERVICE, as its manifest says)
images=(
  "coredns $COREDNS_VERSION $BIN/coredns/coredns 0:0"
  "traefik $TRAEFIK_VERSION $BIN/traefik/traefik 65532:65532"
  "keda $KEDA_VERSION $BIN/keda/operator 65532:65532"
  "keda-adapter $KEDA_VERSION $BIN/keda/adapter 65532:65532"
  "keda-admission-webhooks $KEDA_VERSION $BIN/keda/webhooks 65532:65532"
  "http-add-on-operator $KEDA_HTTP_ADDON_VERSION $BIN/keda-http-add-on/operator 65532:65532"
  "http-add-on-interceptor $KEDA_HTTP_ADDON_VERSION $BIN/keda-http-add-on/interceptor 65532:65532"
  "http-add-on-scaler $KEDA_HTTP_ADDON_VERSION $BIN/keda-http-add-on/scaler 65532:65532"
)
archive="$CACHE/images/components.tar"
mkdir -p "$CACHE/images"

fresh=true
[[ -f "$archive" ]] || fresh=false
for spec in "${images[@]}"; do
  read -r _ _ binary _ <<<"$spec"
  [[ -x "$binary" ]] || die "$binary is missing: run tools/cluster/build.sh"
  [[ "$archive" -nt "$binary" ]] || fresh=false
done
[[ "$archive" -nt "$BIN/pause" ]] || fresh=false
if $fresh; then
  exit 0
fi

refs=()
# The sandbox image holds nothing but the static pause binary.
pause_ref="$IMAGE_PREFIX/pause:$PAUSE_VERSION"
tar -C "$BIN" -c pause | docker import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' - "$pause_ref" >/dev/null
refs+=("$pause_ref")
for spec in "${images[@]}"; do
  read -r name tag binary user <<<"$spec"
  ref="$IMAGE_PREFIX/$name:$tag"
  ctx="$(mktemp -d)"
  cp "$binary" "$ctx/$name"
  DOCKER_BUILDKIT=0 docker build --quiet -t "$ref" -f - "$ctx" >/dev/null 2>&1 <<DOCKERFILE
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="$name" org.opencontainers.image.version="$tag"
COPY $name /$name
USER $user
ENTRYPOINT ["/$name"]
DOCKERFILE
  rm -rf "$ctx"
  refs+=("$ref")
done
docker save -o "$archive.tmp" "${refs[@]}"
mv "$archive.tmp" "$archive"
log "images: ${refs[*]}"
