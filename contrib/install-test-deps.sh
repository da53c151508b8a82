#!/bin/sh
# install-test-deps.sh: installs everything imgsrv's test suite and benchmark need on
# Debian 12 (bookworm), as root, non-interactively. Works on a fresh system whose only apt
# source is Debian's main archive (deb822 debian.sources or one-line sources.list): it adds
# bookworm-backports from the same mirror for Incus 6.0.
# Installs only what is missing (dpkg-query per package; apt-get is asked for the missing
# ones alone, so nothing already installed is upgraded); when everything is there it does
# nothing (no apt-get update).
# Usage: contrib/install-test-deps.sh        (IMGSRV_DEPS_FORCE=1 to ask apt for every package)
# IMGSRV_DEPS_POLICY_RC: the policy-rc.d path (default /usr/sbin/policy-rc.d; for its test).
set -eu
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: run as root (apt-get is used)" >&2
  exit 2
fi
if ! grep -qs 'bookworm' /etc/os-release; then
  echo "install-test-deps: warning: not Debian 12 (bookworm); trying anyway" >&2
fi

PKGS="minisign squashfs-tools qemu-utils busybox-static xz-utils tar nginx sqlite3 openssl
  ca-certificates curl python3 python3-pip python3-cryptography procps iproute2 util-linux shellcheck prometheus systemd
  chromium postgresql"
BPO_PKGS="incus-client incus-extra incus-base"

missing() { # PKG...: prints those not installed, one a line
  for p in "$@"; do
    if [ "${IMGSRV_DEPS_FORCE:-0}" != 0 ] ||
      ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
      printf '%s\n' "$p"
    fi
  done
}

# shellcheck disable=SC2086 # word splitting of the package lists is intended
need=$(missing $PKGS | tr '\n' ' ')
# shellcheck disable=SC2086
need_bpo=$(missing $BPO_PKGS | tr '\n' ' ')
need=${need% } need_bpo=${need_bpo% }
# Garage (the S3 store of the `s3` feature's tests, tests/fixtures/garage-harness), built
# from crates.io: a one-time 10-20 min build on 2 cores, skipped when `garage` is there.
GARAGE_VERSION=2.5.0
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
need_garage=
command -v garage >/dev/null 2>&1 || need_garage=1
if [ -z "$need$need_bpo$need_garage" ] && command -v sstream-query >/dev/null 2>&1; then
  echo "install-test-deps: everything already installed"
  exit 0
fi
if [ -n "$need$need_bpo" ]; then
  # shellcheck disable=SC2086 # one space between the names
  echo "install-test-deps: installing:" $need $need_bpo
fi

# --- bookworm-backports, same mirror and keyring as the existing Debian source ---------
mirror=http://deb.debian.org/debian
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  m=$(awk '/^URIs:/ {print $2; exit}' "$src")
  [ -n "$m" ] && mirror=$m
  k=$(awk '/^Signed-By:/ {print $2; exit}' "$src")
  [ -n "$k" ] && [ -f "$k" ] && keyring=$k
elif [ -f /etc/apt/sources.list ]; then
  # one-line format: deb [options] URI bookworm main ...
  m=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { if ($(i+1) == "bookworm") { print $i; exit } } }' /etc/apt/sources.list)
  [ -n "$m" ] && mirror=$m
fi
if [ -n "$need_bpo" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: $keyring
SRC
fi

# --- packages, without starting their services ------------------------------------------
# Without systemd, package scripts would start nginx on :80 and a real incusd owning
# /var/lib/incus. The tests start their own instances, so forbid service starts meanwhile.
policy=${IMGSRV_DEPS_POLICY_RC:-/usr/sbin/policy-rc.d}
own_policy=
if [ -n "$need$need_bpo" ] && [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 0755 "$policy"
  own_policy=1
fi
cleanup() { [ -n "$own_policy" ] && rm -f "$policy"; return 0; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "$need$need_bpo" ]; then
  apt-get update -q
fi
if [ -n "$need" ]; then
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $need
fi
if [ -n "$need_bpo" ]; then
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends -t bookworm-backports $need_bpo
fi

# --- Canonical's simplestreams reader (sstream-query); not packaged in Debian -----------
if ! command -v sstream-query >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check python-simplestreams 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages python-simplestreams
  hash -r 2>/dev/null || true
fi
command -v sstream-query >/dev/null 2>&1 || { echo "install-test-deps: sstream-query missing after install" >&2; exit 1; }

# --- Garage, from crates.io (see GARAGE_VERSION above) ----------------------------------
if [ -n "$need_garage" ]; then
  command -v cargo >/dev/null 2>&1 || { echo "install-test-deps: cargo is needed to build Garage" >&2; exit 1; }
  echo "install-test-deps: building garage $GARAGE_VERSION (cargo install; 10-20 min, once)"
  cargo install garage --version "$GARAGE_VERSION" --locked
fi
command -v garage >/dev/null 2>&1 || { echo "install-test-deps: garage missing after install" >&2; exit 1; }
[ -x /usr/libexec/incus/incusd ] || { echo "install-test-deps: /usr/libexec/incus/incusd missing after install" >&2; exit 1; }
echo "install-test-deps: done"
