#!/usr/bin/env bash
# Images of the components that run inside the cluster, built from the Debian base image (no registry is
# reachable), each holding one binary from build.sh; saved as archives the node's containerd imports.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

command -v docker >/dev/null || die "docker is needed to build the component images"
docker image inspect debian:bookworm-slim >/dev/null 2>&1 \
  || die "the base image debian:bookworm-slim is missing (.ci/base-image.sh makes it)"

# image NAME TAG BINARY USER
image() {
  local name="$1" tag="$2" binary="$3" user="$4"
  local ref="$IMAGE_PREFIX/$name:$tag" archive="$CACHE/images/$name-$tag.tar"
  if [[ -f "$archive" && "$archive" -nt "$binary" ]]; then
    return 0
  fi
  local ctx
  ctx="$(mktemp -d)"
  cp "$binary" "$ctx/$name"
  DOCKER_BUILDKIT=0 docker build --quiet -t "$ref" -f - "$ctx" >/dev/null <<DOCKERFILE
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="$name" org.opencontainers.image.version="$tag"
COPY $name /$name
USER $user
ENTRYPOINT ["/$name"]
DOCKERFILE
  rm -rf "$ctx"
  docker save -o "$archive.tmp" "$ref"
  mv "$archive.tmp" "$archive"
  log "image $ref"
}

mkdir -p "$CACHE/images"
# The sandbox image holds nothing but the static pause binary.
pause_ref="$IMAGE_PREFIX/pause:$PAUSE_VERSION"
pause_archive="$CACHE/images/pause-$PAUSE_VERSION.tar"
if [[ ! -f "$pause_archive" || "$BIN/pause" -nt "$pause_archive" ]]; then
  tar -C "$BIN" -c pause | docker import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' - "$pause_ref" >/dev/null
  docker save -o "$pause_archive" "$pause_ref"
  log "image $pause_ref"
fi
# CoreDNS binds port 53: it runs as root with every capability dropped but NET_BIND_SERVICE (its manifest).
image coredns "$COREDNS_VERSION" "$BIN/coredns/coredns" 0:0
image traefik "$TRAEFIK_VERSION" "$BIN/traefik/traefik" 65532:65532
image keda "$KEDA_VERSION" "$BIN/keda/operator" 65532:65532
image keda-adapter "$KEDA_VERSION" "$BIN/keda/adapter" 65532:65532
image keda-admission-webhooks "$KEDA_VERSION" "$BIN/keda/webhooks" 65532:65532
image http-add-on-operator "$KEDA_HTTP_ADDON_VERSION" "$BIN/keda-http-add-on/operator" 65532:65532
image http-add-on-interceptor "$KEDA_HTTP_ADDON_VERSION" "$BIN/keda-http-add-on/interceptor" 65532:65532
image http-add-on-scaler "$KEDA_HTTP_ADDON_VERSION" "$BIN/keda-http-add-on/scaler" 65532:65532
