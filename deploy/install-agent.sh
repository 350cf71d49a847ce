#!/usr/bin/env bash
# Install, upgrade or remove the edgefleet agent on a store PC (Debian/Ubuntu, x86_64 or
# arm64). Run it from an edgefleet checkout or release tree (it installs the tree it
# sits in). Layout, options and recovery: docs/install.md.
#
#   sudo deploy/install-agent.sh [--fleet URL --token TOKEN] [--wheelhouse DIR]
#   sudo deploy/install-agent.sh --uninstall [--purge]
#   deploy/install-agent.sh --root DIR --wheelhouse DIR      # tests, image builds
#
# What goes where:
#   /opt/edgefleet/venv                          the agent in its own venv (pinned deps)
#   /etc/edgefleet/agent.yaml                    config (written once, never overwritten)
#   /etc/edgefleet/{mqtt.password,keys/,...}     written by `edge-agent enroll`
#   /var/lib/edgefleet                           models, outbox, hard examples (service user)
#   /etc/systemd/system/edgefleet-agent.service  the unit (replaced on upgrade)
#   /usr/local/bin/edge-agent                    the command, for the admin
set -euo pipefail
# The venv must be readable by the service user whatever root's umask is (a hardened
# box may have 077); the files that must not be world-readable get explicit modes.
umask 022

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$SCRIPT_DIR/.." && pwd)
UNIT_NAME=edgefleet-agent.service
SERVICE_USER=edgefleet

ROOT=""
WHEELHOUSE=""
FLEET_URL=""
TOKEN="${EDGEFLEET_ENROL_TOKEN:-}"
CA_FILE=""
PYTHON="${PYTHON:-python3}"
MEMORY_MAX=""
UNINSTALL=0
PURGE=0
DONE=()    # what this run did, printed at the end

usage() {
  cat <<'EOF'
usage: install-agent.sh [options]

  --fleet URL          enrol with this fleet right after installing (needs --token)
  --token TOKEN        one-time enrolment token (or $EDGEFLEET_ENROL_TOKEN, which
                       stays out of the process list)
  --ca-file PEM        CA of an https fleet URL signed by a private CA
  --wheelhouse DIR     install offline: every wheel from DIR, no index
  --python PATH        interpreter for the venv (>= 3.11; default python3)
  --memory-max SIZE    MemoryMax= of the unit (default 1G)
  --root DIR           install under DIR (tests, image builds): every path prefixed,
                       no user, no chown, no systemctl
  --uninstall          stop and remove the agent; config and data are kept
  --purge              with --uninstall: also remove /etc/edgefleet, /var/lib/edgefleet
                       and the edgefleet user
  -h, --help           this text

Re-running it upgrades in place: the venv is updated, config, models and outbox stay.
EOF
}

die() { echo "install-agent.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }
did() { DONE+=("$1"); }

# Option values: "--opt VALUE" and "--opt=VALUE".
need_value() { if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --root|--wheelhouse|--fleet|--token|--ca-file|--python|--memory-max)
      need_value "$@"; opt=$1; val=$2; shift 2 ;;
    --root=*|--wheelhouse=*|--fleet=*|--token=*|--ca-file=*|--python=*|--memory-max=*)
      opt=${1%%=*}; val=${1#*=}; shift ;;
    --uninstall) UNINSTALL=1; shift; continue ;;
    --purge) PURGE=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  case "$opt" in
    --root) ROOT=$val ;;
    --wheelhouse) WHEELHOUSE=$val ;;
    --fleet) FLEET_URL=$val ;;
    --token) TOKEN=$val ;;
    --ca-file) CA_FILE=$val ;;
    --python) PYTHON=$val ;;
    --memory-max) MEMORY_MAX=$val ;;
  esac
done

[ "$PURGE" -eq 0 ] || [ "$UNINSTALL" -eq 1 ] || die "--purge goes with --uninstall"
if [ -n "$FLEET_URL" ] && [ -z "$TOKEN" ]; then die "--fleet needs --token"; fi
if [ -n "$TOKEN" ] && [ -z "$FLEET_URL" ]; then die "--token needs --fleet"; fi
if [ -n "$MEMORY_MAX" ]; then
  # Bytes with an optional K/M/G/T suffix, or a percentage: what MemoryMax= accepts,
  # and nothing that could break out of the sed expression below.
  printf '%s' "$MEMORY_MAX" | grep -Eq '^[0-9]+[KMGT]?$|^[0-9]+%$|^infinity$' \
    || die "--memory-max $MEMORY_MAX: expected e.g. 1G, 1536M or 50%"
fi

if [ -n "$ROOT" ]; then
  # A throw-away root: absolute, so every prefixed path is.
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" != "/" ] || ROOT=""
fi
# In --root mode nothing touches the running system: no user, no chown, no systemctl.
LIVE=1
[ -z "$ROOT" ] || LIVE=0
if [ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo), or with --root DIR to install into a directory"
fi

OPT="$ROOT/opt/edgefleet"
VENV="$OPT/venv"
ETC="$ROOT/etc/edgefleet"
CONFIG="$ETC/agent.yaml"
DATA="$ROOT/var/lib/edgefleet"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT="$UNIT_DIR/$UNIT_NAME"
WRAPPER="$ROOT/usr/local/bin/edge-agent"
# Paths as the running system sees them (the unit and the wrapper name these).
T_VENV=/opt/edgefleet/venv

have_systemd() { [ "$LIVE" -eq 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# ------------------------------------------------------------------------ uninstall
if [ "$UNINSTALL" -eq 1 ]; then
  if have_systemd && [ -e "$UNIT" ]; then
    systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
    did "stopped and disabled $UNIT_NAME"
  fi
  if [ -e "$UNIT" ]; then rm -f "$UNIT"; did "removed $UNIT"; fi
  if have_systemd; then systemctl daemon-reload; fi
  if [ -e "$WRAPPER" ]; then rm -f "$WRAPPER"; did "removed $WRAPPER"; fi
  if [ -e "$OPT" ]; then rm -rf "${OPT:?}"; did "removed $OPT"; fi
  if [ "$PURGE" -eq 1 ]; then
    if [ -e "$ETC" ]; then rm -rf "${ETC:?}"; did "removed $ETC (config, credentials, keys)"; fi
    if [ -e "$DATA" ]; then rm -rf "${DATA:?}"; did "removed $DATA (models, outbox)"; fi
    if [ "$LIVE" -eq 1 ] && getent passwd "$SERVICE_USER" >/dev/null; then
      if userdel "$SERVICE_USER" >/dev/null 2>&1; then
        did "removed the user $SERVICE_USER"
      else
        did "could not remove the user $SERVICE_USER (still logged in or running?)"
      fi
    fi
  fi
  say "edgefleet agent uninstalled"
  for line in "${DONE[@]}"; do echo "  - $line"; done
  if [ "$PURGE" -eq 0 ]; then
    echo "  kept: $ETC (config, credentials) and $DATA (models, outbox);"
    echo "        --uninstall --purge removes them too"
  fi
  exit 0
fi

# -------------------------------------------------------------------------- checks
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/constraints.txt" ]; then
  die "$SRC is not an edgefleet tree (no pyproject.toml/constraints.txt next to deploy/)"
fi
[ -f "$SCRIPT_DIR/systemd/$UNIT_NAME" ] || die "missing $SCRIPT_DIR/systemd/$UNIT_NAME"
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE is not a directory"
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
if [ -n "$CA_FILE" ]; then
  [ -r "$CA_FILE" ] || die "--ca-file $CA_FILE is not readable"
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON: install python3 (>= 3.11)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); edgefleet needs Python >= 3.11 (--python PATH)"
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  # Debian and Ubuntu ship venv's pip bootstrap separately.
  if [ "$LIVE" -eq 1 ] && [ -z "$WHEELHOUSE" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv (Debian/Ubuntu split it from python3)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    did "installed python3-venv"
  else
    die "$PYTHON cannot make venvs: install python3-venv (apt-get install python3-venv)"
  fi
fi

# ------------------------------------------------------------------ user and dirs
if [ "$LIVE" -eq 1 ] && ! getent passwd "$SERVICE_USER" >/dev/null; then
  useradd --system --user-group --home-dir /var/lib/edgefleet --no-create-home \
    --shell /usr/sbin/nologin --comment "edgefleet agent" "$SERVICE_USER"
  did "created the system user $SERVICE_USER"
fi

# install -d sets mode (and owner) also on a directory that exists already.
mkdir -p "$OPT" "$UNIT_DIR" "$(dirname "$WRAPPER")"
if [ "$LIVE" -eq 1 ]; then
  install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC" "$ETC/keys"
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA"
else
  install -d -m 0750 "$ETC" "$ETC/keys" "$DATA"
fi

# ----------------------------------------------------------------------------- venv
# Re-create the venv only when it is missing or runs on another interpreter than the
# one asked for (a distro upgrade replaced python3.X, or --python changed); otherwise
# pip upgrades it in place. pip resolves and downloads everything before it changes a
# file, so a link that drops mid-way leaves the old venv as it was.
REAL_PY='import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
want=$("$PYTHON" -c "$REAL_PY")
have=""
if [ -x "$VENV/bin/python" ]; then have=$("$VENV/bin/python" -c "$REAL_PY" 2>/dev/null || true); fi
UPGRADE=0
if [ -n "$have" ] && [ "$have" = "$want" ]; then
  UPGRADE=1
else
  existed=0
  if [ -e "$VENV" ]; then existed=1; fi
  say "creating the venv $VENV"
  "$PYTHON" -m venv --clear "$VENV"
  if [ "$existed" -eq 1 ]; then
    did "re-created the venv $VENV on $want (was: ${have:-a broken interpreter})"
  else
    did "created the venv $VENV ($("$VENV/bin/python" -V 2>&1))"
  fi
fi

# Build from a copy of the tree: a build writes build/ and *.egg-info next to the
# sources, which may be read-only (a release on a USB stick) or someone's checkout.
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
tar -C "$SRC" --exclude=__pycache__ --exclude='*.egg-info' -cf - \
  pyproject.toml README.md core agent fleet converters demo | tar -C "$BUILD" -xf -

PIP_ARGS=(--disable-pip-version-check --no-input --quiet)
if [ -n "$WHEELHOUSE" ]; then
  # --isolated: no pip.conf or PIP_* variables may add an index behind our back; the
  # wheelhouse must hold everything (the build backend too: setuptools, wheel).
  PIP_ARGS+=(--isolated --no-index --find-links "$WHEELHOUSE")
  say "installing edgefleet into $VENV offline from $WHEELHOUSE"
else
  say "installing edgefleet into $VENV (pinned versions from constraints.txt)"
fi
# Only the agent's runtime dependencies (pyproject's main list): no converters, no
# torch, no fleet extras. constraints.txt pins each of them to the tested version.
"$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" --upgrade \
  -c "$SRC/constraints.txt" "$BUILD"
VERSION=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("edgefleet"))')
if [ "$LIVE" -eq 1 ] && ! runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -I -c 'import edgefleet.agent.cli' \
    >/dev/null 2>&1; then
  # e.g. a pyenv interpreter under /root (0700): the venv links to it, the service
  # would fail. The venv is useless to the service: drop it so the next run makes anew.
  base=$(readlink -f "$VENV/bin/python")
  rm -rf "${VENV:?}"
  die "the user $SERVICE_USER cannot run $VENV/bin/python (-> $base):" \
    "use an interpreter outside /root, e.g. --python /usr/bin/python3, and run again"
fi
if [ "$UPGRADE" -eq 1 ]; then
  did "upgraded edgefleet $VERSION in $VENV"
else
  did "installed edgefleet $VERSION in $VENV"
fi

# --------------------------------------------------------------------------- config
if [ -e "$CONFIG" ]; then
  did "kept the config $CONFIG"
else
  # Standalone until enrolled: serves the models of `models:` (none yet) on loopback.
  tmp=$(mktemp "$ETC/.agent.yaml.XXXXXX")
  cat >"$tmp" <<EOF
# edgefleet agent configuration, written once by install-agent.sh (never overwritten).
# \`edge-agent enroll\` sets device_id, the fleet section (broker, credentials) and the
# fleet's keys in trust.public_keys, and keeps everything else, comments included
# outside those sections. Reference: README.md ("Configuration reference"); check a
# change with \`edge-agent check-config --config /etc/edgefleet/agent.yaml\`.

# The box's id in the fleet: set at enrolment.
device_id: null

# Local apps only (loopback). Before opening it, set server.auth_token_file.
server:
  host: 127.0.0.1
  port: 8470

store:
  path: $DATA/models

# Bundles must be signed by one of these keys; enrolment adds the fleet's.
trust:
  public_keys: []
  allow_unsigned: false

# Bundles to install at start; the fleet pushes the others.
models: []

logging:
  level: INFO
EOF
  chmod 0640 "$tmp"
  if [ "$LIVE" -eq 1 ]; then chown "root:$SERVICE_USER" "$tmp"; fi
  mv "$tmp" "$CONFIG"
  did "wrote the default config $CONFIG"
fi

# ---------------------------------------------------------------------- unit, command
tmp=$(mktemp "$UNIT_DIR/.$UNIT_NAME.XXXXXX")
if [ -n "$MEMORY_MAX" ]; then
  sed "s/^MemoryMax=.*/MemoryMax=$MEMORY_MAX/" "$SCRIPT_DIR/systemd/$UNIT_NAME" >"$tmp"
else
  cat "$SCRIPT_DIR/systemd/$UNIT_NAME" >"$tmp"
fi
chmod 0644 "$tmp"
mv "$tmp" "$UNIT"
did "installed the unit $UNIT"

# The module form, like the unit: it works wherever the tree was installed from.
tmp=$(mktemp "$(dirname "$WRAPPER")/.edge-agent.XXXXXX")
# shellcheck disable=SC2016  # "$@" belongs in the wrapper, unexpanded
printf '#!/bin/sh\nexec %s/bin/python -I -m edgefleet.agent "$@"\n' "$T_VENV" >"$tmp"
chmod 0755 "$tmp"
mv "$tmp" "$WRAPPER"
did "installed the command $WRAPPER"

# ------------------------------------------------------------------------- enrolment
if [ -n "$FLEET_URL" ]; then
  say "enrolling with $FLEET_URL"
  ENROL_ARGS=(enroll --fleet "$FLEET_URL" --config "$CONFIG" --data-dir "$DATA")
  if [ -n "$CA_FILE" ]; then ENROL_ARGS+=(--ca-file "$CA_FILE"); fi
  if [ "$LIVE" -eq 0 ]; then ENROL_ARGS+=(--owner ""); fi
  # The token goes through the environment, not the command line (ps shows that).
  if ! EDGEFLEET_ENROL_TOKEN=$TOKEN "$VENV/bin/python" -I -m edgefleet.agent "${ENROL_ARGS[@]}"; then
    # The install itself is complete; only the enrolment is missing.
    die "edgefleet $VERSION is installed, but the enrolment failed (see above). Fix that," \
      "then: edge-agent enroll --fleet $FLEET_URL --token NEW-TOKEN;" \
      "systemctl enable --now edgefleet-agent (or run this installer again with --fleet)"
  fi
  did "enrolled with $FLEET_URL"
fi

# --------------------------------------------------------------------------- service
if have_systemd; then
  systemctl daemon-reload
  systemctl enable "$UNIT_NAME" >/dev/null 2>&1
  # restart, not start: an upgrade or a new enrolment takes effect now.
  systemctl restart "$UNIT_NAME"
  did "enabled and (re)started $UNIT_NAME"
elif [ "$LIVE" -eq 1 ]; then
  did "systemd is not running here: start the agent as its user with runuser -u $SERVICE_USER -- /usr/local/bin/edge-agent serve --config /etc/edgefleet/agent.yaml"
fi

# What was written survives a power cut right after the installer said so.
sync
say "edgefleet agent $VERSION installed${ROOT:+ under $ROOT}"
for line in "${DONE[@]}"; do echo "  - $line"; done
if [ -n "$ROOT" ]; then echo; echo "On the system this root becomes:"; fi
cat <<EOF

Check it:
  systemctl status edgefleet-agent          # active (running); restarts on failure
  journalctl -u edgefleet-agent -f          # its log
  curl -s 127.0.0.1:8470/v2/health/ready    # {"ready": true}
EOF
if grep -q '^fleet:' "$CONFIG" 2>/dev/null; then
  echo "  edge-fleet devices list                   # (on the fleet) this box online"
else
  echo "Not enrolled yet: edge-agent enroll --fleet URL --token TOKEN (then systemctl restart edgefleet-agent)"
fi
