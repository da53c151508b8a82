#!/bin/sh
# Installs everything the test suite needs on Debian 12 (bookworm). Needs root.
# Idempotent: safe to run again.
set -eu
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: run as root (apt-get is used)" >&2; exit 2
fi
# The Incus client, incus-simplestreams and incusd come from bookworm-backports:
# same mirror and keyring as the existing Debian source.
src=/etc/apt/sources.list.d/debian.sources
mirror=http://deb.debian.org/debian
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -f "$src" ]; then
  m=$(awk '/^URIs:/ {print $2; exit}' "$src"); [ -n "$m" ] && mirror=$m
  k=$(awk '/^Signed-By:/ {print $2; exit}' "$src"); [ -n "$k" ] && keyring=$k
fi
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: $keyring
SRC
fi
apt-get update -q
apt-get install -y -q --no-install-recommends \
  minisign squashfs-tools qemu-utils busybox-static xz-utils nginx sqlite3 openssl \
  ca-certificates curl python3-pip procps iproute2
apt-get install -y -q --no-install-recommends -t bookworm-backports \
  incus-client incus-extra incus-base
# Canonical's simplestreams reader (sstream-query)
python3 -m pip install -q --disable-pip-version-check python-simplestreams 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages python-simplestreams
command -v sstream-query >/dev/null || { echo "sstream-query missing after install" >&2; exit 1; }
