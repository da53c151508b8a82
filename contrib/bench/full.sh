#!/bin/sh
# full.sh: the full deployment (catalog in PostgreSQL, blobs in Garage over S3) next to its
# peers, in one run on one machine. Figures are printed, never asserted.
#
# Usage: contrib/bench/full.sh [--help]
#
#   (1) download of a published rootfs (make-test-image --pad-mib FULL_BENCH_MIB) through
#       `imgsrv serve` (HTTPS, TLS 1.3; imgsrv streams it from Garage) vs a signed GET of
#       the same object straight from Garage (curl --aws-sigv4, plain HTTP on 127.0.0.1,
#       the way imgsrv reaches it); 1 stream (median of FULL_BENCH_REPEAT), then
#       FULL_BENCH_CONCURRENCY streams at once. Goal: >= 0.8x the direct throughput.
#       Beside it the same download over plain HTTP on the same port, which is how
#       the Incus daemon fetches public artifacts (it tries http:// first).
#   (2) `imgsrv publish --server` of that image to the full deployment (a fresh database
#       and bucket per run) vs to the embedded default (SQLite + files, a fresh data
#       directory per run), alternating, median of FULL_BENCH_PUBLISH_REPEAT.
#   (3) GET /streams/v1/images.json with FULL_BENCH_VERSIONS published versions, p50/p99 of
#       FULL_BENCH_LAT_REQUESTS on one keep-alive connection (gzip, not decoded, as Incus
#       asks; identity reported), PostgreSQL vs SQLite with the same rows. Goal: p50 <= 5 ms.
#   (4) publish latency: wall time of `imgsrv publish --server` of a tiny image (a new
#       metadata tarball each time, one shared rootfs), median of FULL_BENCH_PUBLISHES, at
#       10 versions and at FULL_BENCH_VERSIONS, on PostgreSQL (SQLite beside it). Goal: flat.
#   The catalogs of (3) and (4) grow in place: 10 real publishes, the first FULL_BENCH_PUBLISHES
#   timed, then examples/seed_catalog fills them up to FULL_BENCH_VERSIONS (into PostgreSQL
#   directly with --postgres, while the server runs: seconds, where `imgsrv migrate` of a
#   seeded appliance copies and reads back every blob through S3, minutes), then the
#   images.json figures and the second FULL_BENCH_PUBLISHES timed publishes.
#   PostgreSQL 15 and Garage are throwaways started with tests/fixtures/pg-harness and
#   tests/fixtures/garage-harness and removed at the end (also on Ctrl-C).
#
# Environment (defaults):
#   FULL_BENCH_MIB=1024           padding of the published image for (1) and (2)
#   FULL_BENCH_REPEAT=3           single-stream downloads per side (median)
#   FULL_BENCH_CONCURRENCY=4      concurrent downloads per side
#   FULL_BENCH_PUBLISH_REPEAT=3   publishes of the big image per backend (median)
#   FULL_BENCH_VERSIONS=10000     versions for (3) and the second half of (4), over
#                                 FULL_BENCH_IMAGES=10 seeded images
#   FULL_BENCH_PUBLISHES=20       timed tiny publishes at each catalog size
#   FULL_BENCH_LAT_REQUESTS=200   images.json requests per measurement
#   BENCH_IMGSRV=                 imgsrv built with --features full (default: cargo build
#                                 --release --features full, then use it)
#   FULL_BENCH_SEED=              seed_catalog built with --features full (default: built
#                                 with the above, target/release/examples/seed_catalog)
#   BENCH_DIR=                    work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0                  1 keeps the work directory (and the PostgreSQL and Garage logs)
# Needs: root (pg-harness runs initdb as the user postgres), PostgreSQL 15, garage, curl
# (>= 7.75, --aws-sigv4), minisign, python3, ss, and make-test-image's tools.
# Disk: about (FULL_BENCH_PUBLISH_REPEAT + 2) x FULL_BENCH_MIB under the work directory.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=full-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "full-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "full-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

MIB=${FULL_BENCH_MIB:-1024}
REPEAT=${FULL_BENCH_REPEAT:-3}
CONC=${FULL_BENCH_CONCURRENCY:-4}
PUB_REPEAT=${FULL_BENCH_PUBLISH_REPEAT:-3}
VERSIONS=${FULL_BENCH_VERSIONS:-10000}
IMAGES=${FULL_BENCH_IMAGES:-10}
PUBLISHES=${FULL_BENCH_PUBLISHES:-20}
LAT_N=${FULL_BENCH_LAT_REQUESTS:-200}
check_positive FULL_BENCH_ MIB REPEAT CONC:CONCURRENCY PUB_REPEAT:PUBLISH_REPEAT VERSIONS \
  IMAGES PUBLISHES LAT_N:LAT_REQUESTS
SMALL=10
[ "$VERSIONS" -ge $((SMALL + PUBLISHES)) ] ||
  die "FULL_BENCH_VERSIONS=$VERSIONS is below the $((SMALL + PUBLISHES)) versions the first half of (4) publishes ($SMALL + FULL_BENCH_PUBLISHES): raise it or lower FULL_BENCH_PUBLISHES"
[ "$(id -u)" = 0 ] || die "run as root: pg-harness starts PostgreSQL as the user postgres"
for t in curl minisign python3 ss awk sort; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done
curl --help all 2>/dev/null | grep -q -- '--aws-sigv4' || die "this curl has no --aws-sigv4 (curl >= 7.75 needed)"
PGH=$root/tests/fixtures/pg-harness
GH=$root/tests/fixtures/garage-harness
CURL="curl --http1.1 -sS"

bench_work_dir imgsrv-full-bench
# PostgreSQL's directory lives apart: the user postgres must reach it (the work directory
# is root's, mode 0700), and its socket path must stay short.
PGDIR='' GDIR=''
# shellcheck disable=SC2317 # invoked by the EXIT trap
full_cleanup() {
  rc=$?
  set +e
  stop_pid "$IMGSRV_PID"; IMGSRV_PID=
  keep=${BENCH_KEEP:-0}; [ -z "$own_work" ] && keep=1
  if [ -n "$GDIR" ]; then
    [ "$keep" = 1 ] && cp "$GDIR/garage.log" "$work/garage.log" 2>/dev/null
    "$GH" down "$GDIR" >/dev/null 2>&1
    rm -rf "$GDIR"
  fi
  if [ -n "$PGDIR" ]; then
    [ "$keep" = 1 ] && cp "$PGDIR/postgres.log" "$work/postgres.log" 2>/dev/null
    "$PGH" purge "$PGDIR" >/dev/null 2>&1
  fi
  (exit "$rc") # bench_cleanup exits with $?
  bench_cleanup
}
trap full_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- binaries ------------------------------------------------------------------------------
if [ -z "${BENCH_IMGSRV:-}" ] || [ -z "${FULL_BENCH_SEED:-}" ]; then
  what='--bin imgsrv --example seed_catalog'
  [ -n "${BENCH_IMGSRV:-}" ] && what='--example seed_catalog'
  [ -n "${FULL_BENCH_SEED:-}" ] && what='--bin imgsrv'
  say "full-bench: cargo build --release --features full $what"
  # shellcheck disable=SC2086 # $what is two or four words
  (cd "$root" && cargo build --release --locked -q --features full $what) ||
    die "cargo build --release --features full failed"
  out=${CARGO_TARGET_DIR:-$root/target}/release
  BENCH_IMGSRV=${BENCH_IMGSRV:-$out/imgsrv}
  FULL_BENCH_SEED=${FULL_BENCH_SEED:-$out/examples/seed_catalog}
fi
IMGSRV=$BENCH_IMGSRV SEED=$FULL_BENCH_SEED
[ -x "$IMGSRV" ] || die "BENCH_IMGSRV=$IMGSRV is not an executable"
[ -x "$SEED" ] || die "FULL_BENCH_SEED=$SEED is not an executable"

# --- PostgreSQL and Garage -----------------------------------------------------------------
PGDIR=$(mktemp -d /tmp/imgsrv-fbpg.XXXXXX)
say "full-bench: PostgreSQL in $PGDIR, Garage in $work/garage"
"$PGH" up "$PGDIR" --watch $$ > "$work/pg.url" || die "pg-harness up failed"
GDIR=$work/garage
"$GH" up "$GDIR" $$ > /dev/null || die "garage-harness up failed"
# shellcheck disable=SC1091 # written by garage-harness
. "$GDIR/env"
printf '%s\n' "$IMGSRV_S3_SECRET_ACCESS_KEY" > "$work/s3.secret"
chmod 600 "$work/s3.secret"

# A fresh database and bucket, both named $1 (letters and digits).
new_db() { "$PGH" createdb "$PGDIR" "$1" || die "pg-harness createdb $1 failed"; }
new_bucket() { "$GH" bucket "$GDIR" "$1" >/dev/null || die "garage-harness bucket $1 failed"; }

minisign -G -W -f -p "$work/key.pub" -s "$work/key.sec" >/dev/null
# instance_full DIR NAME: a data directory on a fresh database and bucket NAME, initialised,
# the bench key trusted. instance_embedded DIR: the default stores.
instance_full() {
  url=$(new_db "$2"); new_bucket "$2"
  mkdir -p "$1"
  cat > "$1/imgsrv.toml" <<EOF
[storage]
catalog = "postgres"
postgres_url = "$url"
blobs = "s3"

[storage.s3]
endpoint = "$IMGSRV_S3_ENDPOINT"
bucket = "$2"
region = "$IMGSRV_S3_REGION"
access_key_id = "$IMGSRV_S3_ACCESS_KEY_ID"
secret_access_key_file = "$work/s3.secret"
path_style = true
EOF
  "$IMGSRV" init --data "$1" > "$1.init.log" 2>&1 ||
    { cat "$1.init.log" >&2; die "imgsrv init --data $1 (PostgreSQL + S3) failed: is $IMGSRV built with --features full?"; }
  "$IMGSRV" key add --data "$1" --name bench "$work/key.pub" >/dev/null || die "imgsrv key add ($1) failed"
}
instance_embedded() {
  "$IMGSRV" init --data "$1" > "$1.init.log" 2>&1 || { cat "$1.init.log" >&2; die "imgsrv init --data $1 failed"; }
  "$IMGSRV" key add --data "$1" --name bench "$work/key.pub" >/dev/null || die "imgsrv key add ($1) failed"
}
# serve DIR: starts imgsrv on it (IMGSRV_PID, URL, CERT, DATA)
serve() {
  DATA=$1 CERT=$1/tls/cert.pem
  port=$(free_port)
  URL=https://127.0.0.1:$port
  "$IMGSRV" serve --data "$1" --listen "127.0.0.1:$port" --metrics-listen "" >> "$1.serve.log" 2>&1 &
  IMGSRV_PID=$!
  wait_https "$URL/healthz" 204 "$IMGSRV_PID" "$1.serve.log"
}
unserve() { stop_pid "$IMGSRV_PID"; IMGSRV_PID=; }
publish() { # FILES...: imgsrv publish --server to the served instance
  "$IMGSRV" publish --server "$URL" --ca "$CERT" --token-file "$DATA/admin.token" \
    --key "$work/key.sec" "$@" > "$work/publish.out" 2>&1 ||
    { cat "$work/publish.out" >&2; die "imgsrv publish to $DATA failed (log: $DATA.serve.log)"; }
}
# The early check: an instance on the stores of (3) and (4); a build without the full
# deployment stops here, before the image is built.
instance_full "$work/pg-cat" catalog
instance_embedded "$work/sqlite-cat"

# --- the images ----------------------------------------------------------------------------
say "full-bench: building a ${MIB} MiB test image and $((SMALL + 2 * PUBLISHES)) tiny metadata tarballs"
"$root/tests/fixtures/make-test-image" "$work/big" --pad-mib "$MIB" >/dev/null
META=$work/big/incus.tar.xz ROOTFS=$work/big/rootfs.squashfs
SIZE=$(stat -c %s "$ROOTFS")
BYTES=$((SIZE + $(stat -c %s "$META")))
ROOTFS_SHA=$(sha256sum "$ROOTFS" | cut -d' ' -f1)
"$root/tests/fixtures/make-test-image" "$work/tiny" --serial tiny >/dev/null
mkdir -p "$work/meta"
python3 - "$work/meta" $((SMALL + 2 * PUBLISHES)) <<'PY'
import io, lzma, sys, tarfile
out, n = sys.argv[1], int(sys.argv[2])
for i in range(1, n + 1):
    serial = f"t{i:06d}"
    meta = (f'architecture: "x86_64"\ncreation_date: {1767225600 + i * 60}\nproperties:\n'
            f'  architecture: "x86_64"\n  description: "Benchtiny {serial}"\n  os: "Benchtiny"\n'
            f'  release: "1"\n  serial: "{serial}"\n  variant: "default"\ntemplates: {{}}\n').encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo("metadata.yaml"); ti.size = len(meta); ti.mtime = 1767225600
        t.addfile(ti, io.BytesIO(meta))
    with open(f"{out}/{serial}.tar.xz", "wb") as f:
        f.write(lzma.compress(raw.getvalue(), preset=0))
PY
cat "$META" "$ROOTFS" > /dev/null # page cache warm for every run

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# --- (2) publishing the big image ----------------------------------------------------------
say "full-bench: (2) imgsrv publish --server of $BYTES bytes, embedded and full, $PUB_REPEAT runs each"
: > "$work/pub.embedded"; : > "$work/pub.full"
run=0
while [ "$run" -lt "$PUB_REPEAT" ]; do
  run=$((run + 1))
  d=$work/big-embedded$run
  instance_embedded "$d"; serve "$d"
  t0=$(now); publish "$META" "$ROOTFS"; t1=$(now)
  elapsed "$t0" "$t1" >> "$work/pub.embedded"; echo >> "$work/pub.embedded"
  unserve; rm -rf "$d"
  d=$work/big-full$run
  instance_full "$d" "big$run"; serve "$d"
  t0=$(now); publish "$META" "$ROOTFS"; t1=$(now)
  elapsed "$t0" "$t1" >> "$work/pub.full"; echo >> "$work/pub.full"
  say "  run $run: embedded $(tail -n 1 "$work/pub.embedded") s, full $(tail -n 1 "$work/pub.full") s"
  # the last full instance stays up for (1)
  [ "$run" -lt "$PUB_REPEAT" ] && { unserve; rm -rf "$d"; }
done
PUB_EMB=$(grep -v '^$' "$work/pub.embedded" | median)
PUB_FULL=$(grep -v '^$' "$work/pub.full" | median)
BIG_BUCKET=big$PUB_REPEAT

# --- (1) downloads -------------------------------------------------------------------------
IMG_CIPHER=$($CURL -v -r 0-0 -o /dev/null --cacert "$CERT" "$URL/healthz" 2>&1 |
  sed -n 's/.*SSL connection using \(.*\)$/\1/p' | head -n 1)
item=$($CURL --cacert "$CERT" "$URL/streams/v1/images.json" | python3 -c '
import json, sys
want = sys.argv[1]
for prod in json.load(sys.stdin).get("products", {}).values():
    for ver in prod.get("versions", {}).values():
        for item in ver.get("items", {}).values():
            if item.get("sha256") == want:
                print(item["path"]); sys.exit(0)
sys.exit("no item with sha256 " + want + " in images.json")' "$ROOTFS_SHA") || die "the published rootfs is not in images.json"
IMG_ART=$URL/$item
# the same path over plain HTTP on the same port: how the Incus daemon fetches public
# artifacts (it tries http:// first, docs in ../shared/docs/incus-protocol.md)
PLAIN_ART=http://${URL#https://}/$item
h1=$(printf '%s' "$ROOTFS_SHA" | cut -c1-2) h2=$(printf '%s' "$ROOTFS_SHA" | cut -c3-4)
S3_ART=$IMGSRV_S3_ENDPOINT/$BIG_BUCKET/cas/sha256/$h1/$h2/$ROOTFS_SHA
# get SIDE: one download to /dev/null, prints "BYTES SECONDS"
# (curl 7.88 signs but does not send x-amz-content-sha256, which Garage requires)
get() {
  if [ "$1" = direct ]; then
    $CURL -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' \
      -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' --aws-sigv4 "aws:amz:$IMGSRV_S3_REGION:s3" \
      --user "$IMGSRV_S3_ACCESS_KEY_ID:$IMGSRV_S3_SECRET_ACCESS_KEY" "$S3_ART"
  elif [ "$1" = plain ]; then
    $CURL -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' "$PLAIN_ART"
  else
    $CURL -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' --cacert "$CERT" "$IMG_ART"
  fi
}
check_get() { # FILE SIDE: every line 200 with the whole object
  awk -v s="$SIZE" '$1 != 200 || $2 != s { bad++ } END { exit bad > 0 }' "$1" ||
    die "$2 download: not 200 with $SIZE bytes: $(head -n 1 "$1")"
}
say "full-bench: (1) downloads of $SIZE bytes: 1 stream x $REPEAT (alternating), then $CONC at once"
for side in direct imgsrv plain; do get "$side" > "$work/warm.$side" || die "$side download failed"; check_get "$work/warm.$side" "$side"; done
: > "$work/dl.direct"; : > "$work/dl.imgsrv"; : > "$work/dl.plain"
run=0
while [ "$run" -lt "$REPEAT" ]; do
  run=$((run + 1))
  for side in direct imgsrv plain; do
    get "$side" > "$work/one" || die "$side download failed"
    check_get "$work/one" "$side"
    awk '{ print $2, $3 }' "$work/one" | { read -r b s; mbps "$b" "$s"; echo; } >> "$work/dl.$side"
  done
done
DL_DIRECT=$(grep -v '^$' "$work/dl.direct" | median)
DL_IMGSRV=$(grep -v '^$' "$work/dl.imgsrv" | median)
DL_PLAIN=$(grep -v '^$' "$work/dl.plain" | median)
say "  1 stream (MB/s): direct $(tr '\n' ' ' < "$work/dl.direct"); imgsrv $(tr '\n' ' ' < "$work/dl.imgsrv"); plain HTTP $(tr '\n' ' ' < "$work/dl.plain")"
parallel() { # SIDE -> RESULT: aggregate MB/s of CONC downloads at once
  rm -f "$work"/par.*
  pids='' n=0
  t0=$(now)
  while [ "$n" -lt "$CONC" ]; do
    get "$1" > "$work/par.$n" &
    pids="$pids $!"; n=$((n + 1))
  done
  for p in $pids; do wait "$p" || die "$1: a concurrent download failed"; done
  t1=$(now)
  cat "$work"/par.* > "$work/par.all"; check_get "$work/par.all" "$1"
  RESULT=$(mbps "$((SIZE * CONC))" "$(elapsed "$t0" "$t1")")
}
parallel direct; PAR_DIRECT=$RESULT
parallel imgsrv; PAR_IMGSRV=$RESULT
parallel plain; PAR_PLAIN=$RESULT
say "  $CONC streams (MB/s): direct $PAR_DIRECT, imgsrv $PAR_IMGSRV, plain HTTP $PAR_PLAIN"
unserve

# --- (3) and (4): the catalogs -------------------------------------------------------------
# tiny FIRST COUNT -> RESULT: median ms of COUNT tiny publishes, metadata tarballs FIRST..
tiny() {
  : > "$work/tiny.ms"
  n=$1 last=$(($1 + $2 - 1))
  while [ "$n" -le "$last" ]; do
    serial=$(printf 't%06d' "$n")
    t0=$(now)
    publish --image bench-tiny --version "$serial" "$work/meta/$serial.tar.xz" "$work/tiny/rootfs.squashfs"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) * 1000 }' >> "$work/tiny.ms"
    n=$((n + 1))
  done
  RESULT=$(median < "$work/tiny.ms")
  say "    publishes (ms): $(sort -n "$work/tiny.ms" | tr '\n' ' ')"
}
count_versions() { # -> the versions the served images.json lists
  $CURL --cacert "$CERT" "$URL/streams/v1/images.json" | python3 -c '
import json, sys
print(sum(len(p.get("versions", {})) for p in json.load(sys.stdin).get("products", {}).values()))'
}
# catalog KIND DIR: (3) and (4) on one instance -> SMALL_MS BIG_MS P50 P99 P50ID P99ID GZ ID FOUND
catalog() {
  kind=$1 dir=$2
  say "full-bench: (3)/(4) on $kind"
  serve "$dir"
  say "  $kind: $SMALL publishes into the empty catalog, then $PUBLISHES timed ones"
  tiny 1 "$SMALL"
  tiny $((SMALL + 1)) "$PUBLISHES"; small=$RESULT
  fill=$((VERSIONS - SMALL - PUBLISHES))
  t0=$(now)
  if [ "$kind" = postgres ]; then
    # PostgreSQL: into the database directly, the server running (the guards bump the
    # generation counter: the server rebuilds its projection at the next request)
    sed -n 's/^postgres_url = "\(.*\)"$/\1/p' "$dir/imgsrv.toml" > "$work/cat.url"
    "$SEED" --postgres "$(cat "$work/cat.url")" "$fill" "$IMAGES" >&2 || die "seeding PostgreSQL failed"
  else
    unserve # SQLite: the seeder wants the server stopped
    "$SEED" "$dir" "$fill" "$IMAGES" >&2 || die "seeding SQLite failed"
    serve "$dir"
  fi
  say "  $kind: seeded $fill versions in $(elapsed "$t0" "$(now)") s"
  found=$(count_versions)
  images_json_latency "$URL" gzip
  # shellcheck disable=SC2086 # split "P50 P99 BYTES"
  set -- $RESULT; p50=$1 p99=$2 gz=$3
  images_json_latency "$URL" identity
  # shellcheck disable=SC2086 # split "P50 P99 BYTES"
  set -- $RESULT; p50id=$1 p99id=$2 id=$3
  say "  $kind: $found versions; images.json gzip p50 $p50 ms p99 $p99 ms ($gz bytes), identity p50 $p50id ms p99 $p99id ms ($id bytes)"
  say "  $kind: $PUBLISHES timed publishes at $found versions"
  tiny $((SMALL + PUBLISHES + 1)) "$PUBLISHES"; big=$RESULT
  unserve
  RESULT="$small $big $p50 $p99 $p50id $p99id $gz $id $found"
}
catalog postgres "$work/pg-cat"
# shellcheck disable=SC2086 # split the figures
set -- $RESULT; PG_SMALL=$1 PG_BIG=$2 PG_P50=$3 PG_P99=$4 PG_P50ID=$5 PG_P99ID=$6 PG_GZ=$7 PG_ID=$8 PG_FOUND=$9
catalog sqlite "$work/sqlite-cat"
# shellcheck disable=SC2086 # split the figures
set -- $RESULT; SQ_SMALL=$1 SQ_BIG=$2 SQ_P50=$3 SQ_P99=$4 SQ_P50ID=$5 SQ_P99ID=$6 SQ_GZ=$7 SQ_ID=$8 SQ_FOUND=$9
set --

# --- report --------------------------------------------------------------------------------
met() { if "$@"; then echo met; else echo missed; fi; }
row() { printf '%-40s %-13s %-20s %-6s %-17s %s\n' "$@" | sed 's/[[:space:]]*$//'; }
echo
echo "imgsrv full-deployment benchmark: rootfs $SIZE bytes (${MIB} MiB), $VERSIONS versions, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "CPU: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs (client, imgsrv, PostgreSQL and Garage share them)"
echo "imgsrv $IMG_CIPHER to the client; Garage plain HTTP on 127.0.0.1 (to imgsrv and to the direct GET)"
row measure full peer ratio goal ""
r=$(ratio "$DL_IMGSRV" "$DL_DIRECT")
row "(1) download, 1 stream (MB/s)" "$DL_IMGSRV" "garage direct $DL_DIRECT" "$r" ">= 0.8x direct" "$(met ge "$r" 0.8)"
r=$(ratio "$PAR_IMGSRV" "$PAR_DIRECT")
row "(1) download, $CONC streams (MB/s)" "$PAR_IMGSRV" "garage direct $PAR_DIRECT" "$r" ">= 0.8x direct" "$(met ge "$r" 0.8)"
r=$(ratio "$DL_PLAIN" "$DL_DIRECT")
row "(1) plain HTTP, 1 stream (MB/s)" "$DL_PLAIN" "garage direct $DL_DIRECT" "$r" ">= 0.8x direct" "$(met ge "$r" 0.8)"
r=$(ratio "$PAR_PLAIN" "$PAR_DIRECT")
row "(1) plain HTTP, $CONC streams (MB/s)" "$PAR_PLAIN" "garage direct $PAR_DIRECT" "$r" ">= 0.8x direct" "$(met ge "$r" 0.8)"
row "(2) publish --server, $MIB MiB (s)" "$PUB_FULL" "embedded $PUB_EMB" "$(ratio "$PUB_FULL" "$PUB_EMB")" "(reported)"
row "(2) publish --server (MB/s)" "$(mbps "$BYTES" "$PUB_FULL")" "embedded $(mbps "$BYTES" "$PUB_EMB")" "$(ratio "$PUB_EMB" "$PUB_FULL")" "(reported)"
row "(3) images.json gzip p50 (ms)" "$PG_P50" "sqlite $SQ_P50" "$(ratio "$PG_P50" "$SQ_P50")" "<= 5 ms" "$(met ge 5 "$PG_P50")"
row "(3) images.json gzip p99 (ms)" "$PG_P99" "sqlite $SQ_P99" "$(ratio "$PG_P99" "$SQ_P99")" "(reported)"
row "(3) images.json identity p50/p99 (ms)" "$PG_P50ID/$PG_P99ID" "sqlite $SQ_P50ID/$SQ_P99ID" "$(ratio "$PG_P50ID" "$SQ_P50ID")" "(reported)"
echo "    catalog: postgres $PG_FOUND versions ($PG_GZ bytes gzip, $PG_ID identity), sqlite $SQ_FOUND ($SQ_GZ, $SQ_ID)"
row "(4) publish tiny at $SMALL versions (ms)" "$PG_SMALL" "sqlite $SQ_SMALL" "$(ratio "$PG_SMALL" "$SQ_SMALL")" "(reported)"
row "(4) publish tiny at $VERSIONS versions (ms)" "$PG_BIG" "sqlite $SQ_BIG" "$(ratio "$PG_BIG" "$SQ_BIG")" "(reported)"
row "(4) at $VERSIONS / at $SMALL versions" "$(ratio "$PG_BIG" "$PG_SMALL")" "sqlite $(ratio "$SQ_BIG" "$SQ_SMALL")" "-" "flat (1.00)"
echo "medians: (1) of $REPEAT runs, (2) of $PUB_REPEAT, (4) of $PUBLISHES publishes each (the 'at $SMALL' ones take the catalog from $SMALL to $((SMALL + PUBLISHES)) versions)"
exit 0
