#!/usr/bin/env bash
# Run a development Mosquitto with edgefleet's settings on loopback:
#   deploy/mosquitto/run-dev.sh [PORT] [DATA_DIR]     (defaults: 1883, ./.mosquitto)
# Anonymous clients are allowed: development only. Production adds password_file
# and acl_file (see acl beside this script and docs/mqtt.md).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${1:-1883}"
dir="$(mkdir -p "${2:-.mosquitto}" && cd "${2:-.mosquitto}" && pwd)"
bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
{
  echo "listener $port 127.0.0.1"
  echo "persistence_location $dir/"
  echo "allow_anonymous true"
  # As root Mosquitto would switch to the 'mosquitto' user, who cannot write $dir.
  echo "user $(id -un)"
  cat "$here/edgefleet.conf"
} > "$dir/mosquitto.conf"
exec "$bin" -c "$dir/mosquitto.conf"
