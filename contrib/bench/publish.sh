#!/bin/sh
# publish.sh: publishing one image with `imgsrv publish`, next to `incus-simplestreams add`
# of the same files, in one run.
#
# Usage: contrib/bench/publish.sh [--help]
#
#   The image: tests/fixtures/make-test-image --pad-mib PUBLISH_BENCH_MIB (a real Incus
#   metadata tarball and squashfs rootfs, incompressible padding).
#   Baseline: `incus-simplestreams add METADATA ROOTFS` into a fresh tree (it hashes the
#   files and copies them into the tree).
#   Measured: `imgsrv publish --server` to an `imgsrv serve` on 127.0.0.1 (each root read
#   once, hashed as it is sent over TLS 1.3; on the server hashed, fingerprinted and
#   durably written in one pass; sign, verify, publish), and, when this imgsrv has
#   it, `imgsrv publish --data DIR` into the server's data directory on the same machine
#   (no TLS round trip; signed and verified the same way). Each form runs
#   PUBLISH_BENCH_REPEAT times, each into a fresh tree / server / data directory, page
#   cache warm; the median wall time counts. Nothing is asserted.
#
# Environment (defaults):
#   PUBLISH_BENCH_MIB=1024     padding of the rootfs (about its size)
#   PUBLISH_BENCH_REPEAT=3     runs per form (the median is reported)
#   BENCH_IMGSRV=              imgsrv binary (default: cargo build --release, then use it)
#   BENCH_DIR=                 work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0               1 keeps the work directory
# Needs: incus-simplestreams, minisign, curl, and make-test-image's tools.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=publish-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "publish-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "publish-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

MIB=${PUBLISH_BENCH_MIB:-1024}
REPEAT=${PUBLISH_BENCH_REPEAT:-3}
check_positive PUBLISH_BENCH_ MIB REPEAT
for t in incus-simplestreams minisign curl awk sort; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done

bench_work_dir imgsrv-publish-bench
bench_traps

if [ -z "${BENCH_IMGSRV:-}" ]; then
  say "publish-bench: cargo build --release"
  (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
  BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
fi
IMGSRV=$BENCH_IMGSRV
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

say "publish-bench: building a ${MIB} MiB test image"
"$root/tests/fixtures/make-test-image" "$work/img" --pad-mib "$MIB" >/dev/null
META=$work/img/incus.tar.xz
ROOT=$work/img/rootfs.squashfs
BYTES=$(($(stat -c %s "$META") + $(stat -c %s "$ROOT")))
minisign -G -W -f -p "$work/key.pub" -s "$work/key.sec" >/dev/null
cat "$META" "$ROOT" >/dev/null # page cache warm for every form

# --- the baseline ---------------------------------------------------------------------
: > "$work/ss.times"
i=0
while [ "$i" -lt "$REPEAT" ]; do
  i=$((i + 1))
  tree="$work/tree$i"; mkdir -p "$tree"
  t0=$(now)
  (cd "$tree" && TZ=UTC incus-simplestreams add "$META" "$ROOT" >/dev/null) || die "incus-simplestreams add failed"
  t1=$(now)
  elapsed "$t0" "$t1" >> "$work/ss.times"; echo >> "$work/ss.times"
  rm -rf "$tree"
done

# --- imgsrv publish --server ------------------------------------------------------------
: > "$work/server.times"
i=0
while [ "$i" -lt "$REPEAT" ]; do
  i=$((i + 1))
  data="$work/data$i"
  "$IMGSRV" init --data "$data" >/dev/null
  "$IMGSRV" key add --data "$data" --name bench "$work/key.pub" >/dev/null
  port=$(free_port)
  "$IMGSRV" serve --data "$data" --listen "127.0.0.1:$port" --metrics-listen "" \
    >"$work/serve$i.log" 2>&1 &
  IMGSRV_PID=$!
  CERT="$data/tls/cert.pem"
  wait_https "https://127.0.0.1:$port/healthz" 204 "$IMGSRV_PID" "$work/serve$i.log"
  t0=$(now)
  "$IMGSRV" publish --server "https://127.0.0.1:$port" --ca "$CERT" \
    --token-file "$data/admin.token" --key "$work/key.sec" "$META" "$ROOT" >/dev/null \
    || die "imgsrv publish --server failed (log: $work/serve$i.log)"
  t1=$(now)
  elapsed "$t0" "$t1" >> "$work/server.times"; echo >> "$work/server.times"
  stop_pid "$IMGSRV_PID"; IMGSRV_PID=
  rm -rf "$data"
done

# --- imgsrv publish --data (when this imgsrv has it) ------------------------------------
: > "$work/data.times"
if "$IMGSRV" publish --help | grep -q -- '--data'; then
  i=0
  while [ "$i" -lt "$REPEAT" ]; do
    i=$((i + 1))
    data="$work/ldata$i"
    "$IMGSRV" init --data "$data" >/dev/null
    "$IMGSRV" key add --data "$data" --name bench "$work/key.pub" >/dev/null
    t0=$(now)
    "$IMGSRV" publish --data "$data" --key "$work/key.sec" "$META" "$ROOT" >/dev/null \
      || die "imgsrv publish --data failed"
    t1=$(now)
    elapsed "$t0" "$t1" >> "$work/data.times"; echo >> "$work/data.times"
    rm -rf "$data"
  done
fi

med() { grep -v '^$' "$1" | median; }
ss=$(med "$work/ss.times")
srv=$(med "$work/server.times")
echo "publish-bench: $(nproc) CPU(s), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); $BYTES bytes (metadata + rootfs), median of $REPEAT"
printf '%-44s %9s %9s %16s\n' "" "seconds" "MB/s" "vs simplestreams"
printf '%-44s %9s %9s %16s\n' "incus-simplestreams add" "$ss" "$(mbps "$BYTES" "$ss")" "1.00x"
printf '%-44s %9s %9s %16s\n' "imgsrv publish --server (loopback, TLS)" "$srv" "$(mbps "$BYTES" "$srv")" "$(ratio "$srv" "$ss")x"
if [ -s "$work/data.times" ]; then
  dat=$(med "$work/data.times")
  printf '%-44s %9s %9s %16s\n' "imgsrv publish --data (same machine)" "$dat" "$(mbps "$BYTES" "$dat")" "$(ratio "$dat" "$ss")x"
else
  echo "imgsrv publish --data: not in this imgsrv"
fi
echo "(time ratios: below 1.00x is faster than incus-simplestreams add)"
