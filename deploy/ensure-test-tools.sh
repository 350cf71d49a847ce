#!/usr/bin/env bash
# Installs what the test suite runs for real, from Debian's packages, when missing:
# - Mosquitto (the tests start their own broker on a free loopback port; nothing here
#   starts a system service);
# - systemd-analyze (the installer test verifies the agent's unit with it);
# - Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver: the console's
#   browser tests drive Debian's headless Chromium through Selenium, which is pointed at
#   these two binaries and never downloads a browser or a driver of its own);
# - promtool (the metrics tests run `promtool check metrics`). Debian ships it only in
#   the `prometheus` package, which also carries the server and an init script: it is
#   installed with service starts denied (policy-rc.d), so no Prometheus runs afterwards.
# Idempotent and quiet: prints one line, and only when it installs something.
set -euo pipefail
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  missing+=(systemd)
fi
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ -x /usr/bin/promtool ] || missing+=(prometheus)
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing ${missing[*]} from Debian's packages" >&2
# No package's maintainer script may start a service (the prometheus package would start
# a server on :9090 otherwise): policy-rc.d exit 101 = "action forbidden". A machine
# that already has a policy keeps it; one added here is removed afterwards.
policy=/usr/sbin/policy-rc.d
added_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  added_policy=1
fi
# apt's and the maintainer scripts' chatter goes to a log, shown only if the install fails.
log=$(mktemp)
cleanup() {
  if [ -n "$added_policy" ]; then $SUDO rm -f "$policy"; fi
  rm -f "$log"
}
trap cleanup EXIT
if ! { $SUDO apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "ensure-test-tools: installing ${missing[*]} failed" >&2
  exit 1
fi
