# llmpods gateway: nginx with the njs module, both from Debian bookworm, running as a non-root user.
# The config (nginx.conf + gateway.js, rendered by the gateway role) is mounted at /etc/llmpods/gateway,
# the API keys at /etc/llmpods/keys/api-keys. nginx writes to /tmp only, so the root filesystem can be
# read-only.
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE}

# Debian package versions (globs follow bookworm's point and security releases of the same upstream).
ARG NGINX_VERSION="1.22.1-9+deb12u*"
ARG NJS_VERSION="0.7.9-*"
ARG GATEWAY_UID=10002
ARG GATEWAY_USER=nginx-llmpods
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="llmpods gateway" \
      org.opencontainers.image.description="nginx + njs sidecar for llmpods: API keys, /<model> routing, readiness that never waits on a generation" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.vendor="llmpods" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/llmpods/inference" \
      org.opencontainers.image.base.name="debian:bookworm-slim"

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "nginx-light=${NGINX_VERSION}" \
        "libnginx-mod-http-js=${NJS_VERSION}" \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && groupadd --system --gid "${GATEWAY_UID}" "${GATEWAY_USER}" \
    && useradd --system --uid "${GATEWAY_UID}" --gid "${GATEWAY_UID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin "${GATEWAY_USER}" \
    && mkdir -p /etc/llmpods/gateway /etc/llmpods/keys \
    && test -f /usr/lib/nginx/modules/ngx_http_js_module.so

USER ${GATEWAY_UID}:${GATEWAY_UID}
EXPOSE 8080
# SIGQUIT: graceful stop, running generations are allowed to finish.
STOPSIGNAL SIGQUIT
ENTRYPOINT ["nginx"]
CMD ["-c", "/etc/llmpods/gateway/nginx.conf", "-g", "daemon off;"]
