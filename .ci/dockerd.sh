#!/usr/bin/env bash
# Start the Docker engine if it is not answering yet, and wait until it does.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
nohup dockerd --host=unix:///var/run/docker.sock >/var/log/dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see /var/log/dockerd.log" >&2
tail -20 /var/log/dockerd.log >&2
exit 1
