#!/bin/sh
# mirror.sh: `imgsrv mirror` throughput next to plain curl downloads of the same files from
# the same upstream, in one run.
#
# Usage: contrib/bench/mirror.sh [--help]
#
#   The upstream: MIRROR_BENCH_IMAGES versions of one product, each a padded test image
#   (tests/fixtures/make-test-image --pad-mib), added with the stock incus-simplestreams and
#   served by Debian's nginx over TLS 1.3 (sendfile, no access log).
#   Baseline: curl downloads every file the mirror takes (metadata tarballs and rootfs),
#   MIRROR_BENCH_JOBS at a time (xargs -P), each into a file on the same disk.
#   Measured: `imgsrv mirror --data DIR --jobs MIRROR_BENCH_JOBS` into a fresh data directory
#   (download, sha256 and fingerprint checks, ingest into the blob store with fsync, sign,
#   publish), and the same into a running `imgsrv serve` (--server; the upload goes through
#   the HTTPS API). Each side runs MIRROR_BENCH_REPEAT times; the median wall time counts.
#   MB/s is 10^6 bytes per second of upstream file bytes.
#
# Environment (defaults):
#   MIRROR_BENCH_TOTAL_MIB=1024  padding over all images (about the total size)
#   MIRROR_BENCH_IMAGES=4        upstream versions (each TOTAL/IMAGES MiB)
#   MIRROR_BENCH_JOBS=4          parallel downloads (curl and mirror alike)
#   MIRROR_BENCH_REPEAT=3        runs per side (the median is reported)
#   MIRROR_BENCH_SERVER=1        0 skips the --server measurement
#   BENCH_IMGSRV=                imgsrv binary (default: cargo build --release, then use it)
#   BENCH_DIR=                   work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0                 1 keeps the work directory
#   BENCH_STRICT=0               1 makes a ratio under 0.8 exit with status 3
# Needs: curl, nginx, python3, incus-simplestreams, minisign, ss, and make-test-image's tools.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=mirror-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "mirror-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "mirror-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

TOTAL_MIB=${MIRROR_BENCH_TOTAL_MIB:-1024}
IMAGES=${MIRROR_BENCH_IMAGES:-4}
JOBS=${MIRROR_BENCH_JOBS:-4}
REPEAT=${MIRROR_BENCH_REPEAT:-3}
WITH_SERVER=${MIRROR_BENCH_SERVER:-1}
STRICT=${BENCH_STRICT:-0}
check_positive MIRROR_BENCH_ TOTAL_MIB IMAGES JOBS REPEAT
[ "$IMAGES" -le 9 ] || die "MIRROR_BENCH_IMAGES is at most 9"
PAD=$((TOTAL_MIB / IMAGES))
[ "$PAD" -ge 1 ] || die "MIRROR_BENCH_TOTAL_MIB / MIRROR_BENCH_IMAGES must be at least 1"

for t in curl nginx python3 incus-simplestreams minisign ss shuf awk sort xargs; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done

# --- work dir, background processes (stopped on exit) -------------------------------------
bench_work_dir imgsrv-mirror-bench
bench_traps

# --- helpers (more in common.sh) ----------------------------------------------------------
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# cpu_of FILE: user+sys seconds that /usr/bin/time wrote (empty without /usr/bin/time)
cpu_of() { [ -s "$1" ] && awk 'END { printf "%.2f", $1 + $2 }' "$1"; }
TIMECMD=
[ -x /usr/bin/time ] && TIMECMD=/usr/bin/time
timed() { # CPUFILE CMD...: run CMD, CPU seconds (user sys) of it and its children into CPUFILE
  f=$1; shift
  if [ -n "$TIMECMD" ]; then "$TIMECMD" -o "$f" -f '%U %S' "$@"; else : > "$f"; "$@"; fi
}
# median_cpu FILE: the median of the second column (CPU seconds), or n/a
median_cpu() { c=$(awk 'NF > 1 { print $2 }' "$1" | median); [ "$c" = 0 ] && c=n/a; echo "$c"; }
# record_run LABEL CPU_LABEL CPUFILE TIMES T0 T1: reports run $r (seconds, MB/s of
# $TOTAL_BYTES, CPU seconds) and appends "SECONDS CPU" to TIMES
record_run() {
  e=$(elapsed "$5" "$6")
  say "  $1 run $r: ${e} s, $(mbps "$TOTAL_BYTES" "$e") MB/s, $2 $(cpu_of "$3") s"
  echo "$e $(cpu_of "$3")" >> "$4"
}
# check_mirrored OUT WHAT: OUT (imgsrv mirror's output) says all $IMAGES versions were mirrored
check_mirrored() {
  grep -q "summary: $IMAGES versions mirrored" "$1" ||
    { cat "$1" >&2; die "imgsrv mirror $2 did not mirror $IMAGES versions"; }
}

# --- imgsrv -----------------------------------------------------------------------------------
if [ -z "${BENCH_IMGSRV:-}" ]; then
  say "mirror-bench: cargo build --release"
  (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
  BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
fi
IMGSRV=$BENCH_IMGSRV
[ -x "$IMGSRV" ] || die "imgsrv binary $IMGSRV not found"
minisign -G -W -f -p "$work/mirror.pub" -s "$work/mirror.key" >/dev/null || die "minisign -G failed"
# the certificate nginx serves with (and the --server target uses): imgsrv's own
"$IMGSRV" init --data "$work/certs" >/dev/null || die "imgsrv init failed"
CERT=$work/certs/tls/cert.pem KEY=$work/certs/tls/key.pem

# --- the upstream tree ------------------------------------------------------------------------
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)
say "mirror-bench: work dir $work; $IMAGES images of ${PAD} MiB padding; $(nproc) CPUs (${CPU_MODEL:-unknown})"
TREE=$work/tree
mkdir -p "$TREE"
i=1
while [ "$i" -le "$IMAGES" ]; do
  say "mirror-bench: make-test-image $i/$IMAGES (--pad-mib $PAD)"
  "$root/tests/fixtures/make-test-image" "$work/img$i" --serial "2026010${i}_0000" --pad-mib "$PAD" >/dev/null
  (cd "$TREE" && TZ=UTC incus-simplestreams add "$work/img$i/incus.tar.xz" "$work/img$i/rootfs.squashfs") ||
    die "incus-simplestreams add failed"
  rm -rf "$work/img$i"
  i=$((i + 1))
done
# every file the mirror takes: path and size
python3 - "$TREE/streams/v1/images.json" > "$work/files" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
seen = set()
for p in doc["products"].values():
    for v in p["versions"].values():
        for i in v["items"].values():
            if i["ftype"] in ("incus.tar.xz", "squashfs") and i["path"] not in seen:
                seen.add(i["path"])
                print(i["path"], i["size"])
PY
TOTAL_BYTES=$(awk '{ s += $2 } END { printf "%.0f", s }' "$work/files")
NFILES=$(wc -l < "$work/files" | tr -d ' ')
sync

# --- nginx ----------------------------------------------------------------------------------------
NGX=$work/nginx
mkdir -p "$NGX/tmp"
NGX_PORT=$(free_port)
write_nginx_conf "$NGX" "$NGX_PORT" "$CERT" "$KEY" "$TREE" || die "nginx configuration failed"
nginx -c "$NGX/nginx.conf" -e "$NGX/error.log" > "$NGX/stdout.log" 2>&1 &
NGINX_PID=$!
UP=https://127.0.0.1:$NGX_PORT
wait_https "$UP/streams/v1/index.json" 200 "$NGINX_PID" "$NGX/error.log"
CIPHER=$(curl -sS -v -o /dev/null --cacert "$CERT" "$UP/streams/v1/index.json" 2>&1 |
  sed -n 's/.*SSL connection using \(.*\)$/\1/p' | head -n 1)
say "mirror-bench: nginx on $UP ($CIPHER); $NFILES files, $TOTAL_BYTES bytes"

# --- baseline: curl, JOBS at a time, into files ----------------------------------------------------
: > "$work/curl.times"
r=1
while [ "$r" -le "$REPEAT" ]; do
  rm -rf "$work/curl-out"; mkdir -p "$work/curl-out"
  t0=$(now)
  awk -v up="$UP" -v out="$work/curl-out" '{ n = split($1, a, "/"); print up "/" $1 " " out "/" a[n] }' "$work/files" > "$work/curl.list"
  # shellcheck disable=SC2016 # $0 $1 $2 are the inner sh's
  timed "$work/curl-$r.cpu" xargs -P "$JOBS" -n 2 sh -c 'curl --http1.1 -sSf --cacert "$0" -o "$2" "$1"' "$CERT" \
    < "$work/curl.list" || die "curl download failed"
  t1=$(now)
  got=$(du -sb "$work/curl-out" | cut -f1)
  [ "$got" -ge "$TOTAL_BYTES" ] || die "curl fetched $got bytes, expected $TOTAL_BYTES"
  record_run curl CPU "$work/curl-$r.cpu" "$work/curl.times" "$t0" "$t1"
  r=$((r + 1))
done
rm -rf "$work/curl-out"
CURL_S=$(median < "$work/curl.times")
CURL_CPU=$(median_cpu "$work/curl.times")
CURL_MBPS=$(mbps "$TOTAL_BYTES" "$CURL_S")

# --- imgsrv mirror --data: a fresh data directory per run -------------------------------------------
: > "$work/data.times"
r=1
while [ "$r" -le "$REPEAT" ]; do
  D=$work/data-$r
  "$IMGSRV" init --data "$D" >/dev/null || die "imgsrv init failed"
  "$IMGSRV" key add --data "$D" --name mirror "$work/mirror.pub" >/dev/null || die "imgsrv key add failed"
  sync
  t0=$(now)
  timed "$work/data-$r.cpu" "$IMGSRV" mirror --data "$D" --key "$work/mirror.key" --upstream-ca "$CERT" --jobs "$JOBS" "$UP/" \
    > "$work/mirror-data-$r.out" 2>&1 || { cat "$work/mirror-data-$r.out" >&2; die "imgsrv mirror --data failed"; }
  t1=$(now)
  check_mirrored "$work/mirror-data-$r.out" --data
  record_run "mirror --data" CPU "$work/data-$r.cpu" "$work/data.times" "$t0" "$t1"
  rm -rf "$D"
  r=$((r + 1))
done
DATA_S=$(median < "$work/data.times")
DATA_CPU=$(median_cpu "$work/data.times")
DATA_MBPS=$(mbps "$TOTAL_BYTES" "$DATA_S")

# --- imgsrv mirror --server: a fresh server per run ---------------------------------------------------
SERVER_MBPS=n/a SERVER_S=n/a SERVER_CPU=n/a
if [ "$WITH_SERVER" = 1 ]; then
  : > "$work/server.times"
  r=1
  while [ "$r" -le "$REPEAT" ]; do
    S=$work/server-$r
    "$IMGSRV" init --data "$S" >/dev/null || die "imgsrv init failed"
    "$IMGSRV" key add --data "$S" --name mirror "$work/mirror.pub" >/dev/null || die "imgsrv key add failed"
    cp "$CERT" "$S/tls/cert.pem"; cp "$KEY" "$S/tls/key.pem"
    PORT=$(free_port)
    "$IMGSRV" serve --data "$S" --listen "127.0.0.1:$PORT" > "$work/serve-$r.log" 2>&1 &
    IMGSRV_PID=$!
    wait_https "https://127.0.0.1:$PORT/healthz" 204 "$IMGSRV_PID" "$work/serve-$r.log"
    sync
    t0=$(now)
    timed "$work/server-$r.cpu" env XDG_CACHE_HOME="$work/cache-$r" "$IMGSRV" mirror --server "https://127.0.0.1:$PORT" --ca "$CERT" \
      --token-file "$S/admin.token" --key "$work/mirror.key" --upstream-ca "$CERT" --jobs "$JOBS" "$UP/" \
      > "$work/mirror-server-$r.out" 2>&1 || { cat "$work/mirror-server-$r.out" >&2; die "imgsrv mirror --server failed"; }
    t1=$(now)
    check_mirrored "$work/mirror-server-$r.out" --server
    record_run "mirror --server" "client CPU" "$work/server-$r.cpu" "$work/server.times" "$t0" "$t1"
    stop_pid "$IMGSRV_PID"; IMGSRV_PID=''
    rm -rf "$S" "$work/cache-$r"
    r=$((r + 1))
  done
  SERVER_S=$(median < "$work/server.times")
  SERVER_CPU=$(median_cpu "$work/server.times")
  SERVER_MBPS=$(mbps "$TOTAL_BYTES" "$SERVER_S")
fi

# --- report ------------------------------------------------------------------------------------------
R=$(ratio "$DATA_MBPS" "$CURL_MBPS")
if ge "$R" 0.8; then V=PASS; else V=FAIL; fi
echo "imgsrv mirror benchmark: $NFILES files, $TOTAL_BYTES bytes ($IMAGES versions), jobs $JOBS, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "CPU: ${CPU_MODEL:-unknown}, $(nproc) CPUs (client, nginx and imgsrv share them); TLS: $CIPHER"
row() { printf '%-28s %8s %8s %9s %6s %9s %s\n' "$@"; }
row measure seconds MB/s "CPU s" ratio target result
row "curl -o FILE, $JOBS at a time" "$CURL_S" "$CURL_MBPS" "$CURL_CPU" "1.00" "baseline" ""
row "imgsrv mirror --data" "$DATA_S" "$DATA_MBPS" "$DATA_CPU" "$R" ">= 0.8" "$V"
if [ "$WITH_SERVER" = 1 ]; then
  row "imgsrv mirror --server" "$SERVER_S" "$SERVER_MBPS" "$SERVER_CPU" \
    "$(ratio "$SERVER_MBPS" "$CURL_MBPS")" "(reported)" ""
fi
echo "median of $REPEAT runs each (seconds, CPU s): curl $(tr '\n' ';' < "$work/curl.times") --data $(tr '\n' ';' < "$work/data.times")"
echo "CPU s: user + system of the client process and its children (--server: the mirror client only, not the server)"
if [ "$V" = FAIL ] && [ "$STRICT" = 1 ]; then exit 3; fi
exit 0
