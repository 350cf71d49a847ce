#!/usr/bin/env bash
# Installs what the test suite runs for real, from Debian's packages, when missing:
# Mosquitto (the tests start their own broker on a free loopback port; nothing here
# starts a system service) and systemd-analyze (the installer test verifies the
# agent's unit with it).
set -euo pipefail
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  missing+=(systemd)
fi
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing ${missing[*]} from Debian's packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
