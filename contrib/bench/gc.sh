#!/bin/sh
# gc.sh: `imgsrv gc` on a catalog with GC_BENCH_BLOBS blobs, next to the raw cost of the
# same deletions (find -delete on the same files, one SQL DELETE of the same rows), in
# one run.
#
# Usage: contrib/bench/gc.sh [--help]
#
#   (1) steady state: GC_BENCH_BLOBS blobs, every one cited by a published version
#       (examples/seed_catalog with --files: GC_BENCH_BLOBS / 2 versions, a rootfs and a
#       metadata blob each): `imgsrv gc --grace 0` finds nothing to do; the time is the
#       cost of deciding that (every claim read, the store walked).
#   (2) collection: GC_BENCH_BLOBS blobs nothing cites: `imgsrv gc --grace 0` removes
#       every row and file (claims read again per row in batches of 256, under the
#       blobs lock). Baseline: on a copy of the same directory, `find sha256 -type f
#       -delete` plus `sqlite3 catalog.db "DELETE FROM cas_blobs"` (the floor: no
#       liveness check, no plan).
#   Both print wall time and blobs/s; nothing is asserted.
#
# Environment (defaults):
#   GC_BENCH_BLOBS=100000     blobs in each catalog
#   BENCH_IMGSRV=             imgsrv binary (default: cargo build --release, then use it)
#   BENCH_SEED_CMD=           seeder (default: cargo build --release --example seed_catalog)
#   BENCH_DIR=                work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0              1 keeps the work directory
# Needs: sqlite3, find, awk.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=gc-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "gc-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "gc-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

BLOBS=${GC_BENCH_BLOBS:-100000}
case $BLOBS in ''|*[!0-9]*|0|1) die "GC_BENCH_BLOBS must be a whole number >= 2 (got '$BLOBS')" ;; esac
for t in sqlite3 find awk; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done

bench_work_dir imgsrv-gc-bench
bench_traps

if [ -z "${BENCH_IMGSRV:-}" ]; then
  say "gc-bench: cargo build --release"
  (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
  BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
fi
if [ -z "${BENCH_SEED_CMD:-}" ]; then
  say "gc-bench: cargo build --release --example seed_catalog"
  (cd "$root" && cargo build --release --locked -q --example seed_catalog) \
    || die "cargo build --example seed_catalog failed"
  BENCH_SEED_CMD=${CARGO_TARGET_DIR:-$root/target}/release/examples/seed_catalog
fi
IMGSRV=$BENCH_IMGSRV
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s <= 0) s = 1e-9; printf "%.0f", n / s }'; }
rows() { sqlite3 "$1/catalog.db" "SELECT count(*) FROM cas_blobs"; }
files() { find "$1/sha256" -type f | wc -l; }

# --- (1) steady state ---------------------------------------------------------------------
live="$work/live"
"$IMGSRV" init --data "$live" >/dev/null
say "gc-bench: seeding $((BLOBS / 2)) published versions ($BLOBS blobs with files)"
"$BENCH_SEED_CMD" "$live" $((BLOBS / 2)) 10 --files >/dev/null
n_live=$(rows "$live")
t0=$(now)
"$IMGSRV" gc --data "$live" --grace 0 >"$work/live.out"
t1=$(now)
steady=$(elapsed "$t0" "$t1")
[ "$(rows "$live")" = "$n_live" ] || die "gc removed live blobs: $(cat "$work/live.out")"

# --- (2) collection -----------------------------------------------------------------------
dead="$work/dead"
"$IMGSRV" init --data "$dead" >/dev/null
say "gc-bench: seeding $BLOBS unreferenced blobs"
"$BENCH_SEED_CMD" "$dead" 0 1 --garbage "$BLOBS" >/dev/null
cp -a "$dead" "$work/floor"
n_dead=$(rows "$dead")
t0=$(now)
"$IMGSRV" gc --data "$dead" --grace 0 >"$work/dead.out"
t1=$(now)
collect=$(elapsed "$t0" "$t1")
if [ "$(rows "$dead")" != 0 ] || [ "$(files "$dead")" != 0 ]; then
  die "gc left blobs: $(tail -3 "$work/dead.out")"
fi

t0=$(now)
find "$work/floor/sha256" -type f -delete
sqlite3 "$work/floor/catalog.db" "DELETE FROM cas_blobs"
t1=$(now)
floor=$(elapsed "$t0" "$t1")

echo "gc-bench: $(nproc) CPU(s), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf '%-58s %10s %12s\n' "" "seconds" "blobs/s"
printf '%-58s %10s %12s\n' "(1) imgsrv gc, $n_live live blobs, nothing to remove" "$steady" "$(rate "$n_live" "$steady")"
printf '%-58s %10s %12s\n' "(2) imgsrv gc, $n_dead unreferenced blobs removed" "$collect" "$(rate "$n_dead" "$collect")"
printf '%-58s %10s %12s\n' "    floor: find -delete + one SQL DELETE, same blobs" "$floor" "$(rate "$n_dead" "$floor")"
printf '%-58s %10s\n' "    imgsrv / floor" "$(ratio "$collect" "$floor")x"
