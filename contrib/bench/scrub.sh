#!/bin/sh
# scrub.sh: `imgsrv scrub` read throughput next to `openssl dgst -sha256` over the same blob
# files, and the images.json latency of a serving imgsrv with a scrub running beside it.
#
# Usage: contrib/bench/scrub.sh [--help]
#
#   The store: SCRUB_BENCH_BLOBS random blobs (openssl rand) of SCRUB_BENCH_TOTAL_MIB in all,
#   uploaded through the upload API of a running `imgsrv serve` (curl), so they sit in the
#   data directory as any upload does (DATA/sha256/..., 0444, fsynced).
#   (1) Baseline: `openssl dgst -sha256` of every blob file in one process; measured:
#   `imgsrv scrub --data DIR` (every blob re-hashed, no rate limit; its JSON report gives the
#   bytes read and the read phase's MB/s; the wall time includes the catalog checks). Both
#   with the page cache warm (a first untimed pass reads everything), best of
#   SCRUB_BENCH_REPEAT. MB/s is 10^6 bytes per second.
#   (2) GET /streams/v1/images.json (gzip, as Incus asks) SCRUB_BENCH_LAT_REQUESTS times on
#   one keep-alive connection with SCRUB_BENCH_VERSIONS published versions in the catalog
#   (examples/seed_catalog), p50 and p99: alone, then with `imgsrv scrub --rate
#   SCRUB_BENCH_RATE` (the periodic scrub's default) running beside the server on the same
#   data directory, then with an unlimited scrub beside it (restarted until the measurement
#   ends). The seeded versions cite blobs that are not stored, so the scrubs beside also
#   report (and check) thousands of missing blobs: their catalog work is part of the load.
#
# Environment (defaults):
#   SCRUB_BENCH_TOTAL_MIB=2048    bytes of blobs in all
#   SCRUB_BENCH_BLOBS=16          number of blobs (each TOTAL/BLOBS MiB)
#   SCRUB_BENCH_REPEAT=2          timed runs per side (the best counts)
#   SCRUB_BENCH_VERSIONS=2000     published versions seeded for (2)
#   SCRUB_BENCH_LAT_REQUESTS=3000 images.json requests per latency measurement (a few seconds)
#   SCRUB_BENCH_RATE=50MB/s       --rate of the first scrub beside the server
#   BENCH_IMGSRV=                 imgsrv binary (default: cargo build --release, then use it)
#   BENCH_SEED_CMD=               seeder, run as `$BENCH_SEED_CMD DATA_DIR N` with the server
#                                 stopped (default: cargo build --release --example
#                                 seed_catalog)
#   BENCH_DIR=                    work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0                  1 keeps the work directory
# Needs: curl, openssl, python3, ss; disk: about TOTAL_MIB + TOTAL/BLOBS MiB.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=scrub-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "scrub-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "scrub-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

TOTAL_MIB=${SCRUB_BENCH_TOTAL_MIB:-2048}
BLOBS=${SCRUB_BENCH_BLOBS:-16}
REPEAT=${SCRUB_BENCH_REPEAT:-2}
VERSIONS=${SCRUB_BENCH_VERSIONS:-2000}
LAT_N=${SCRUB_BENCH_LAT_REQUESTS:-3000}
RATE=${SCRUB_BENCH_RATE:-50MB/s}
check_positive SCRUB_BENCH_ TOTAL_MIB BLOBS REPEAT VERSIONS LAT_N:LAT_REQUESTS
BLOB_MIB=$((TOTAL_MIB / BLOBS))
[ "$BLOB_MIB" -ge 1 ] || die "SCRUB_BENCH_TOTAL_MIB / SCRUB_BENCH_BLOBS must be at least 1"

for t in curl openssl python3 ss shuf awk sort find xargs; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done

bench_work_dir imgsrv-scrub-bench
bench_traps
CURL="curl --http1.1 -sS"
SCRUB_LOOP_PID=''
stop_loop() { [ -z "$SCRUB_LOOP_PID" ] || { stop_pid "$SCRUB_LOOP_PID"; SCRUB_LOOP_PID=''; }; }
# shellcheck disable=SC2317 # invoked by the EXIT trap
scrub_cleanup() { rc=$?; stop_loop; (exit "$rc"); bench_cleanup; }
trap scrub_cleanup EXIT

# --- imgsrv and the seeder --------------------------------------------------------------------
if [ -z "${BENCH_IMGSRV:-}" ]; then
  say "scrub-bench: cargo build --release"
  (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
  BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
fi
IMGSRV=$BENCH_IMGSRV
[ -x "$IMGSRV" ] || die "imgsrv binary $IMGSRV not found"
SEED_CMD=${BENCH_SEED_CMD:-}
if [ -z "$SEED_CMD" ]; then
  say "scrub-bench: cargo build --release --example seed_catalog"
  (cd "$root" && cargo build --release --locked -q --example seed_catalog) ||
    die "cannot build examples/seed_catalog (or set BENCH_SEED_CMD)"
  SEED_CMD=${CARGO_TARGET_DIR:-$root/target}/release/examples/seed_catalog
fi

DATA=$work/data
"$IMGSRV" init --data "$DATA" >/dev/null || die "imgsrv init failed"
# the server's own periodic scrub stays out of the measurements
printf '[scrub]\ninterval = "off"\n' > "$DATA/imgsrv.toml"
CERT=$DATA/tls/cert.pem
TOKEN=$(cat "$DATA/admin.token")
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)

start_server() {
  PORT=$(free_port)
  "$IMGSRV" serve --data "$DATA" --listen "127.0.0.1:$PORT" >> "$work/serve.log" 2>&1 &
  IMGSRV_PID=$!
  URL=https://127.0.0.1:$PORT
  wait_https "$URL/healthz" 204 "$IMGSRV_PID" "$work/serve.log"
}
api() { # METHOD PATH [CURL ARGS...]: the JSON answer on stdout
  m=$1 p=$2; shift 2
  $CURL -f --cacert "$CERT" -H "Authorization: Bearer $TOKEN" -X "$m" "$@" "$URL$p"
}
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# --- the store: BLOBS random blobs through the upload API ---------------------------------------
start_server
say "scrub-bench: work dir $work; $BLOBS blobs of $BLOB_MIB MiB; $(nproc) CPUs (${CPU_MODEL:-unknown})"
i=1
while [ "$i" -le "$BLOBS" ]; do
  f=$work/blob.bin
  openssl rand -out "$f" $((BLOB_MIB << 20)) || die "openssl rand failed"
  size=$(wc -c < "$f" | tr -d ' ')
  digest=sha256:$(openssl dgst -sha256 -r "$f" | cut -d' ' -f1)
  id=$(api POST /v1/uploads -H 'Content-Type: application/json' \
    -d "{\"expected_digest\":\"$digest\",\"expected_size_bytes\":$size}" | field id) ||
    die "POST /v1/uploads failed"
  etag=$(api PUT "/v1/uploads/$id/parts/1" -H 'Expect:' -T "$f" | field etag) ||
    die "PUT part failed"
  api POST "/v1/uploads/$id/complete" -H 'Content-Type: application/json' \
    -d "{\"parts\":[{\"number\":1,\"etag\":\"$etag\",\"size_bytes\":$size}]}" >/dev/null ||
    die "complete failed"
  i=$((i + 1))
done
rm -f "$work/blob.bin"
stop_pid "$IMGSRV_PID"; IMGSRV_PID=''
find "$DATA/sha256" -type f > "$work/files"
NFILES=$(wc -l < "$work/files" | tr -d ' ')
TOTAL_BYTES=$(xargs du -cb < "$work/files" | awk 'END { print $1 }')
[ "$NFILES" = "$BLOBS" ] || die "the store holds $NFILES blobs, expected $BLOBS"

# --- (1) throughput ---------------------------------------------------------------------------------
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
say "scrub-bench: warming the page cache"
xargs cat < "$work/files" > /dev/null
best() { sort -n | head -n 1; }
: > "$work/openssl.times"; : > "$work/scrub.times"; : > "$work/scrub.read"
r=1
while [ "$r" -le "$REPEAT" ]; do
  t0=$(now)
  xargs openssl dgst -sha256 < "$work/files" > /dev/null || die "openssl dgst failed"
  t1=$(now)
  e=$(elapsed "$t0" "$t1"); echo "$e" >> "$work/openssl.times"
  say "  openssl dgst -sha256 run $r: $e s, $(mbps "$TOTAL_BYTES" "$e") MB/s"
  t0=$(now)
  "$IMGSRV" scrub --data "$DATA" --json > "$work/scrub-$r.json" || die "imgsrv scrub failed (see $work/scrub-$r.json)"
  t1=$(now)
  e=$(elapsed "$t0" "$t1"); echo "$e" >> "$work/scrub.times"
  python3 - "$work/scrub-$r.json" "$TOTAL_BYTES" >> "$work/scrub.read" <<'PY' || die "the scrub did not read every byte"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["counts"]
if c["bytes_read"] != int(sys.argv[2]) or c["damaged"] or r["problems"]:
    sys.exit(f"scrub report: {c}")
print("%.1f" % r["read_mb_per_second"])
PY
  say "  imgsrv scrub run $r: $e s, $(mbps "$TOTAL_BYTES" "$e") MB/s wall, $(tail -n 1 "$work/scrub.read") MB/s read phase"
  r=$((r + 1))
done
OPENSSL_S=$(best < "$work/openssl.times"); OPENSSL_MBPS=$(mbps "$TOTAL_BYTES" "$OPENSSL_S")
SCRUB_S=$(best < "$work/scrub.times"); SCRUB_MBPS=$(mbps "$TOTAL_BYTES" "$SCRUB_S")
SCRUB_READ=$(sort -rn < "$work/scrub.read" | head -n 1)

# --- (2) images.json beside a scrub ---------------------------------------------------------------
say "scrub-bench: seeding $VERSIONS versions with $SEED_CMD"
# shellcheck disable=SC2086 # SEED_CMD may carry arguments
$SEED_CMD "$DATA" "$VERSIONS" >&2 || die "seeding with $SEED_CMD failed"
start_server
$CURL -f --cacert "$CERT" -H 'Accept-Encoding: gzip' -o "$work/images.json.gz" "$URL/streams/v1/images.json" ||
  die "GET images.json failed"
GZ_BYTES=$(wc -c < "$work/images.json.gz" | tr -d ' ')
lat_cfg=$work/lat.cfg
: > "$lat_cfg"
i=0
while [ "$i" -le "$LAT_N" ]; do
  printf 'url = "%s/streams/v1/images.json"\noutput = "/dev/null"\n' "$URL" >> "$lat_cfg"
  i=$((i + 1))
done
latency() { # -> RESULT "p50 p99" in ms; the first request (TLS handshake) is dropped
  $CURL --cacert "$CERT" -H 'Accept-Encoding: gzip' -K "$lat_cfg" -w '%{http_code} %{time_total}\n' \
    > "$work/lat.out" || die "images.json requests failed"
  awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/lat.out" || die "images.json answered non-200"
  RESULT=$(tail -n +2 "$work/lat.out" | awk '{ print $2 * 1000 }' | sort -n | awk '
    { v[NR] = $1 }
    END { printf "%.2f %.2f", v[int(NR * 0.50 + 0.999999)], v[int(NR * 0.99 + 0.999999)] }')
}
# scrub_loop ARGS...: `imgsrv scrub` over and over in the background (SCRUB_LOOP_PID)
scrub_loop() {
  (
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM
    while :; do
      "$IMGSRV" scrub --data "$DATA" "$@" > /dev/null 2>&1 &
      child=$!
      wait "$child" || true
    done
  ) &
  SCRUB_LOOP_PID=$!
  sleep 1 # past the scrub's start-up, into its reads
}
latency; ALONE=$RESULT
say "  alone: p50/p99 $ALONE ms"
scrub_loop --rate "$RATE"; latency; RATED=$RESULT; stop_loop
say "  beside a scrub at $RATE: p50/p99 $RATED ms"
scrub_loop; latency; FREE=$RESULT; stop_loop
say "  beside an unlimited scrub: p50/p99 $FREE ms"
stop_pid "$IMGSRV_PID"; IMGSRV_PID=''

# --- report -----------------------------------------------------------------------------------------
echo "imgsrv scrub benchmark: $NFILES blobs, $TOTAL_BYTES bytes; images.json with $VERSIONS versions ($GZ_BYTES bytes gzip); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "CPU: ${CPU_MODEL:-unknown}, $(nproc) CPUs (client, server and scrub share them); page cache warm"
row() { printf '%-44s %12s %12s %8s\n' "$@"; }
row measure imgsrv baseline ratio
row "(1) re-hash every blob, wall (MB/s)" "$SCRUB_MBPS" "$OPENSSL_MBPS" "$(ratio "$SCRUB_MBPS" "$OPENSSL_MBPS")"
row "(1) scrub read phase (MB/s)" "$SCRUB_READ" "openssl" "$(ratio "$SCRUB_READ" "$OPENSSL_MBPS")"
# shellcheck disable=SC2086 # RESULT is two words: p50 p99
set -- $ALONE; A50=$1 A99=$2
# shellcheck disable=SC2086
set -- $RATED; R50=$1 R99=$2
# shellcheck disable=SC2086
set -- $FREE; F50=$1 F99=$2
row "(2) images.json p50 (ms), scrub $RATE beside" "$R50" "alone $A50" "$(ratio "$R50" "$A50")"
row "(2) images.json p50 (ms), unlimited scrub" "$F50" "alone $A50" "$(ratio "$F50" "$A50")"
row "(2) images.json p99 (ms): alone/rated/free" "$A99/$R99/$F99" "-" "-"
echo "best of $REPEAT runs (seconds): openssl $(tr '\n' ' ' < "$work/openssl.times")| scrub $(tr '\n' ' ' < "$work/scrub.times")"
exit 0
