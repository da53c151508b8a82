#!/bin/sh
# bench.sh: imgsrv's performance figures next to their baselines, in one run on one file.
#
# Usage: contrib/bench/bench.sh [--nginx-only] [--help]
#
#   (a) download of a BENCH_SIZE_MIB artifact over TLS 1.3: imgsrv vs nginx (Debian's)
#       serving the same file with the same certificate, 1 stream and BENCH_CONCURRENCY
#       concurrent streams (curl -o /dev/null), MB/s (10^6 bytes/s)
#   (b) ingest (upload + hash + store) through the upload API with curl (POST /v1/uploads,
#       PUT part 1, POST complete; digest declared up front) vs `openssl dgst -sha256`; also
#       reported: the ratio to the disk's durable write rate (dd conv=fsync), and the
#       end-to-end `imgsrv publish` (client hashing + upload + fingerprinting + publish)
#   (c) /streams/v1/images.json latency p50/p99 with BENCH_VERSIONS published versions, gzip
#       transfer as Incus asks for it (Accept-Encoding: gzip, not decoded), and identity
#   (d) imgsrv's peak RSS (VmHWM) during BENCH_RSS_CONCURRENCY concurrent downloads
#
# --nginx-only  measure only what needs no imgsrv: nginx downloads, the openssl hash rate
#               and the disk's durable write rate.
#
# Environment (defaults):
#   BENCH_SIZE_MIB=1024        artifact size (a padded test image rootfs); 64 for a quick run
#   BENCH_CONCURRENCY=16       concurrent streams for (a)
#   BENCH_REPEAT=3             single-stream runs per server (the median is reported)
#   BENCH_VERSIONS=10000       published versions for (c), spread over BENCH_CATALOG_IMAGES=10
#   BENCH_LAT_REQUESTS=500     images.json requests per measurement (one keep-alive connection)
#   BENCH_SEED_CMD=            seeder for (c), run as `$BENCH_SEED_CMD DATA_DIR N` while
#                              imgsrv is stopped; it must leave N published versions. Default:
#                              examples/seed_catalog (cargo build --release --example
#                              seed_catalog); if that cannot be built, the slow fallback
#                              publishes N versions with `imgsrv publish`, BENCH_SEED_JOBS=2
#                              at a time
#   BENCH_RSS_CONCURRENCY=64   concurrent downloads for (d), each cut at BENCH_RSS_SECONDS=20
#   BENCH_RSS_FLAT_MIB=64      (d) counts as flat when peak - idle RSS stays within this
#   BENCH_IMGSRV=              imgsrv binary (default: cargo build --release, then use it)
#   BENCH_DIR=                 work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0               1 keeps the work directory
#   BENCH_STRICT=0             1 makes a missed target exit with status 3
# Needs: curl, openssl, nginx, python3, ss (iproute2), minisign, and make-test-image's tools.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

only=all
while [ $# -gt 0 ]; do
  case $1 in
    --nginx-only) only=nginx ;;
    -h|--help) usage 0 ;;
    *) echo "bench: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
  shift
done

SIZE_MIB=${BENCH_SIZE_MIB:-1024}
CONC=${BENCH_CONCURRENCY:-16}
REPEAT=${BENCH_REPEAT:-3}
VERSIONS=${BENCH_VERSIONS:-10000}
CAT_IMAGES=${BENCH_CATALOG_IMAGES:-10}
LAT_N=${BENCH_LAT_REQUESTS:-500}
SEED_JOBS=${BENCH_SEED_JOBS:-2}
SEED_CMD=${BENCH_SEED_CMD:-}
SEED_ARGS=''
RSS_CONC=${BENCH_RSS_CONCURRENCY:-64}
RSS_SECONDS=${BENCH_RSS_SECONDS:-20}
RSS_FLAT_MIB=${BENCH_RSS_FLAT_MIB:-64}
STRICT=${BENCH_STRICT:-0}
check_positive BENCH_ SIZE_MIB CONC:CONCURRENCY REPEAT VERSIONS CAT_IMAGES:CATALOG_IMAGES \
  LAT_N:LAT_REQUESTS SEED_JOBS RSS_CONC:RSS_CONCURRENCY RSS_SECONDS RSS_FLAT_MIB

tools="curl openssl nginx python3 ss shuf awk sort timeout dd"
[ "$only" = all ] && tools="$tools minisign"
for t in $tools; do command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"; done

# --- work dir, background processes (stopped on exit) -------------------------------------
bench_work_dir imgsrv-bench
bench_traps

# --- helpers (more in common.sh) ----------------------------------------------------------
CURL="curl --http1.1 -sS"

cipher() { # URL: the negotiated TLS version and cipher
  $CURL -v -r 0-0 -o /dev/null --cacert "$CERT" "$1" 2>&1 |
    sed -n 's/.*SSL connection using \(.*\)$/\1/p' | head -n 1
}

# The measuring functions run in the main shell (no command substitution) and leave their
# result in RESULT, so that a signal interrupts `wait` and the cleanup trap runs at once.
RESULT=''
dl_single() { # URL LABEL -> RESULT: median MB/s over REPEAT runs
  : > "$work/single.txt"
  i=0
  while [ $i -lt "$REPEAT" ]; do
    out=$($CURL --cacert "$CERT" -o /dev/null -w '%{size_download} %{time_total}' "$1") ||
      die "$2: download failed"
    # shellcheck disable=SC2086 # split "SIZE TIME"
    set -- "$1" "$2" $out
    [ "$3" = "$SIZE_BYTES" ] || die "$2: got $3 bytes, expected $SIZE_BYTES"
    mbps "$3" "$4" >> "$work/single.txt"; echo >> "$work/single.txt"
    set -- "$1" "$2"
    i=$((i + 1))
  done
  say "  $2 1 stream, runs (MB/s): $(tr '\n' ' ' < "$work/single.txt")"
  RESULT=$(median < "$work/single.txt")
}

dl_parallel() { # URL N LABEL -> RESULT: aggregate MB/s
  rm -f "$work"/par.*
  t0=$(now)
  pids='' i=0
  while [ $i -lt "$2" ]; do
    $CURL --cacert "$CERT" -o /dev/null -w '%{size_download}\n' "$1" > "$work/par.$i" &
    pids="$pids $!"; i=$((i + 1))
  done
  fails=0
  for p in $pids; do wait "$p" || fails=$((fails + 1)); done
  t1=$(now)
  [ "$fails" = 0 ] || die "$3: $fails of $2 concurrent downloads failed"
  total=$(cat "$work"/par.* | awk '{ s += $1 } END { printf "%.0f", s }')
  [ "$total" = "$(awk -v n="$2" -v s="$SIZE_BYTES" 'BEGIN { printf "%.0f", n * s }')" ] ||
    die "$3: $total bytes downloaded, expected $2 x $SIZE_BYTES"
  RESULT=$(mbps "$total" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  say "  $3 $2 streams: $RESULT MB/s aggregate"
}

# --- the artifact ---------------------------------------------------------------------------
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)
[ -n "$CPU_MODEL" ] || CPU_MODEL=unknown
say "bench: work dir $work; artifact ${SIZE_MIB} MiB; $(nproc) CPUs ($CPU_MODEL)"
say "bench: building the test image (make-test-image --pad-mib $SIZE_MIB)"
"$root/tests/fixtures/make-test-image" "$work/img" --serial 20260101_0000 --pad-mib "$SIZE_MIB"
META=$work/img/incus.tar.xz
ROOTFS=$work/img/rootfs.squashfs
SIZE_BYTES=$(wc -c < "$ROOTFS" | tr -d ' ')
# Start the disk measurements with no dirty pages left over from building the image.
sync

# --- openssl hash rate (baseline for ingest) -----------------------------------------------
say "bench: openssl dgst -sha256 (best of 2, page cache warm)"
cat "$ROOTFS" > /dev/null
best=0
for _ in 1 2; do
  t0=$(now); ROOTFS_SHA=$(openssl dgst -sha256 -r "$ROOTFS" | cut -d' ' -f1); t1=$(now)
  r=$(mbps "$SIZE_BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  ge "$r" "$best" && best=$r
done
OPENSSL_MBPS=$best
say "  openssl sha256: $OPENSSL_MBPS MB/s"

# --- the disk's durable write rate (ceiling for ingest: imgsrv fsyncs every blob) ----------
say "bench: dd if=ROOTFS of=WORKDIR/ddtest bs=1M conv=fsync (best of 2)"
best=0
for _ in 1 2; do
  rm -f "$work/ddtest"
  t0=$(now)
  dd if="$ROOTFS" of="$work/ddtest" bs=1M conv=fsync 2> "$work/dd.err" ||
    { cat "$work/dd.err" >&2; die "dd failed"; }
  t1=$(now)
  r=$(mbps "$SIZE_BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  say "  dd run: $r MB/s"
  ge "$r" "$best" && best=$r
done
rm -f "$work/ddtest"
DD_MBPS=$best
say "  dd conv=fsync: $DD_MBPS MB/s"

# --- imgsrv: binary, data dir, certificate ---------------------------------------------------
if [ "$only" = all ]; then
  if [ -z "${BENCH_IMGSRV:-}" ]; then
    say "bench: cargo build --release"
    (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
    BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
  fi
  IMGSRV=$BENCH_IMGSRV
  [ -x "$IMGSRV" ] || die "imgsrv binary $IMGSRV not found"
  # Seeder for (c): BENCH_SEED_CMD, else examples/seed_catalog (seconds for 10,000
  # versions), else (no cargo, build failure) the slow `imgsrv publish` loop.
  if [ -z "$SEED_CMD" ]; then
    say "bench: cargo build --release --example seed_catalog"
    if (cd "$root" && cargo build --release --locked -q --example seed_catalog); then
      SEED_CMD=${CARGO_TARGET_DIR:-$root/target}/release/examples/seed_catalog
      SEED_ARGS=$CAT_IMAGES
    else
      say "bench: WARNING: cannot build examples/seed_catalog; seeding (c) with imgsrv publish (slow)"
    fi
  fi
  DATA=$work/imgsrv-data
  "$IMGSRV" init --data "$DATA" >/dev/null || die "imgsrv init failed"
  CERT=$DATA/tls/cert.pem KEY=$DATA/tls/key.pem
  minisign -G -W -f -p "$work/bench.pub" -s "$work/bench.key" >/dev/null || die "minisign -G failed"
  "$IMGSRV" key add --data "$DATA" --name bench "$work/bench.pub" >/dev/null || die "imgsrv key add failed"
else
  CERT=$work/cert.pem KEY=$work/key.pem
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
    -keyout "$KEY" -out "$CERT" 2>/dev/null || die "openssl req failed"
fi

# --- nginx ----------------------------------------------------------------------------------
NGX=$work/nginx
mkdir -p "$NGX/www" "$NGX/tmp"
ln -s "$ROOTFS" "$NGX/www/artifact.squashfs"
NGX_PORT=$(free_port)
write_nginx_conf "$NGX" "$NGX_PORT" "$CERT" "$KEY" "$NGX/www" "location = /healthz { return 204; }" || die "nginx configuration failed"
nginx -c "$NGX/nginx.conf" -e "$NGX/error.log" > "$NGX/stdout.log" 2>&1 &
NGINX_PID=$!
NGX_URL=https://127.0.0.1:$NGX_PORT
wait_https "$NGX_URL/healthz" 204 "$NGINX_PID" "$NGX/error.log"
NGX_CIPHER=$(cipher "$NGX_URL/artifact.squashfs")
say "bench: nginx $(nginx -v 2>&1 | sed 's|.*/||') on $NGX_URL ($NGX_CIPHER)"

# --- imgsrv: serve, publish (ingest) -------------------------------------------------------
IMG_PORT='' IMG_URL=''
start_imgsrv() {
  IMG_PORT=$(free_port)
  IMG_URL=https://127.0.0.1:$IMG_PORT
  "$IMGSRV" serve --data "$DATA" --listen "127.0.0.1:$IMG_PORT" >> "$work/imgsrv.log" 2>&1 &
  IMGSRV_PID=$!
  wait_https "$IMG_URL/healthz" 204 "$IMGSRV_PID" "$work/imgsrv.log"
  # (d) reads /proc/PID/status: the pid must be imgsrv's own, not a wrapper shell's.
  tr '\0' ' ' < "/proc/$IMGSRV_PID/cmdline" | grep -q " serve --data " ||
    die "pid $IMGSRV_PID is not imgsrv serve"
}
publish() { # IMAGE VERSION METADATA ROOTFS
  "$IMGSRV" publish --server "$IMG_URL" --ca "$CERT" --token-file "$DATA/admin.token" \
    --key "$work/bench.key" --image "$1" --version "$2" "$3" "$4"
}
# Prints the server-relative path of the item whose sha256 is $1 in images.json.
item_path() {
  $CURL --cacert "$CERT" "$IMG_URL/streams/v1/images.json" | python3 -c '
import json, sys
want = sys.argv[1]
for prod in json.load(sys.stdin).get("products", {}).values():
    for ver in prod.get("versions", {}).values():
        for item in ver.get("items", {}).values():
            if item.get("sha256") == want:
                print(item["path"]); sys.exit(0)
sys.exit("no item with sha256 " + want + " in images.json")' "$1"
}

# json_field NAME FILE: the string value of "NAME" in a flat JSON answer (no python3 start-up
# inside a timed section).
json_field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$2" | head -n 1; }
# The upload API as a client that knows the digest up front: POST /v1/uploads (declares
# digest and size), PUT part 1 (the whole file), POST complete. Timed from the PUT's start to
# the complete's end. A fresh data dir per run, because the server short-circuits a digest it
# already has; its own server, removed afterwards.
ingest_api_once() { # RUN -> RESULT: MB/s
  main_data=$DATA main_cert=$CERT
  DATA=$work/ingest-$1
  "$IMGSRV" init --data "$DATA" >/dev/null || die "imgsrv init ($DATA) failed"
  CERT=$DATA/tls/cert.pem
  start_imgsrv
  auth="Authorization: Bearer $(cat "$DATA/admin.token")"
  code=$($CURL --cacert "$CERT" -H "$auth" -H 'Content-Type: application/json' \
    --data-binary "{\"expected_digest\":\"sha256:$ROOTFS_SHA\",\"expected_size_bytes\":$SIZE_BYTES}" \
    -o "$work/ingest.begin" -w '%{http_code}' "$IMG_URL/v1/uploads") || die "POST /v1/uploads failed"
  [ "$code" = 201 ] || die "POST /v1/uploads answered $code (expected 201 on a fresh data dir): $(cat "$work/ingest.begin")"
  id=$(json_field id "$work/ingest.begin")
  [ -n "$id" ] || die "POST /v1/uploads: no id in $(cat "$work/ingest.begin")"
  # `Expect:` off: the server does not answer 100-continue, curl would wait 1 s for it.
  t0=$(now)
  code=$($CURL --cacert "$CERT" -H "$auth" -H 'Expect:' -T "$ROOTFS" \
    -o "$work/ingest.put" -w '%{http_code}' "$IMG_URL/v1/uploads/$id/parts/1") ||
    die "PUT /v1/uploads/$id/parts/1 failed"
  [ "$code" = 200 ] || die "PUT part 1 answered $code: $(cat "$work/ingest.put")"
  etag=$(json_field etag "$work/ingest.put")
  code=$($CURL --cacert "$CERT" -H "$auth" -H 'Content-Type: application/json' \
    --data-binary "{\"parts\":[{\"number\":1,\"etag\":\"$etag\",\"size_bytes\":$SIZE_BYTES}]}" \
    -o "$work/ingest.complete" -w '%{http_code}' "$IMG_URL/v1/uploads/$id/complete") ||
    die "POST /v1/uploads/$id/complete failed"
  t1=$(now)
  [ "$code" = 200 ] || die "POST complete answered $code: $(cat "$work/ingest.complete")"
  [ "$(json_field state "$work/ingest.complete")" = ready ] ||
    die "upload not ready after complete: $(cat "$work/ingest.complete")"
  [ "$etag" = "sha256:$ROOTFS_SHA" ] || say "  (note: part etag $etag is not sha256:$ROOTFS_SHA)"
  # The blob is on disk under its hex digest (wherever the CAS layout puts it).
  [ -n "$(find "$DATA" -type f -name "$ROOTFS_SHA*" -size "${SIZE_BYTES}c" | head -n 1)" ] ||
    die "no stored file named $ROOTFS_SHA of $SIZE_BYTES bytes under $DATA after complete"
  RESULT=$(mbps "$SIZE_BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  stop_pid "$IMGSRV_PID"; IMGSRV_PID=
  rm -rf "$DATA"
  DATA=$main_data CERT=$main_cert
}

INGEST_MBPS='' PUBLISH_MBPS='' IMG_SINGLE='' IMG_PAR='' IMG_CIPHER=''
P50='' P99='' P50ID='' P99ID='' GZ_BYTES='' CAT_BYTES='' CAT_FOUND=''
RSS_IDLE='' RSS_ONE='' RSS_PEAK='' RSS_MOVED=''
if [ "$only" = all ]; then
  say "bench: (b) ingest through the upload API (curl; POST, PUT part 1, complete), best of 2"
  best=0
  for run in 1 2; do
    ingest_api_once "$run"
    say "  upload API run $run: $RESULT MB/s"
    ge "$RESULT" "$best" && best=$RESULT
  done
  INGEST_MBPS=$best

  start_imgsrv
  IMG_CIPHER=$(cipher "$IMG_URL/healthz")
  say "bench: imgsrv on $IMG_URL ($IMG_CIPHER)"
  say "bench: (b) end-to-end: imgsrv publish of $(wc -c < "$META" | tr -d ' ') + $SIZE_BYTES bytes"
  t0=$(now)
  publish bench 20260101_0000 "$META" "$ROOTFS" > "$work/publish.out" 2>&1 ||
    { cat "$work/publish.out" >&2; die "imgsrv publish failed"; }
  t1=$(now)
  PUBLISH_MBPS=$(mbps "$(($(wc -c < "$META") + SIZE_BYTES))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  say "  imgsrv publish: $PUBLISH_MBPS MB/s"
  IMG_ART_URL=$IMG_URL/$(item_path "$ROOTFS_SHA")
fi

# --- (a) downloads ----------------------------------------------------------------------------
say "bench: (a) downloads, 1 stream x $REPEAT runs, then $CONC concurrent"
dl_single "$NGX_URL/artifact.squashfs" nginx; NGX_SINGLE=$RESULT
if [ "$only" = all ]; then dl_single "$IMG_ART_URL" imgsrv; IMG_SINGLE=$RESULT; fi
dl_parallel "$NGX_URL/artifact.squashfs" "$CONC" nginx; NGX_PAR=$RESULT
if [ "$only" = all ]; then dl_parallel "$IMG_ART_URL" "$CONC" imgsrv; IMG_PAR=$RESULT; fi

# --- (d) peak RSS during concurrent downloads ----------------------------------------------
rss_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$IMGSRV_PID/status"; }
rss_phase() { # N: downloads cut at RSS_SECONDS -> RESULT: bytes moved
  pids='' i=0
  rm -f "$work"/rss.*
  while [ $i -lt "$1" ]; do
    $CURL --cacert "$CERT" -o /dev/null --max-time "$RSS_SECONDS" -w '%{size_download}\n' \
      "$IMG_ART_URL" > "$work/rss.$i" 2>/dev/null &
    pids="$pids $!"; i=$((i + 1))
  done
  for p in $pids; do
    wait "$p" || { rc=$?; [ "$rc" = 28 ] || die "download failed (curl exit $rc) during the RSS phase"; }
  done
  RESULT=$(cat "$work"/rss.* | awk '{ s += $1 } END { printf "%.0f", s }')
}
if [ "$only" = all ]; then
  say "bench: (d) imgsrv RSS: idle, 1 download, $RSS_CONC concurrent downloads (<= ${RSS_SECONDS}s each)"
  # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each peak is that phase's own.
  reset_hwm() { echo 5 > "/proc/$IMGSRV_PID/clear_refs" 2>/dev/null || say "  (cannot reset VmHWM: peaks include earlier phases)"; }
  reset_hwm; sleep 1
  RSS_IDLE=$(rss_kb VmRSS)
  reset_hwm; rss_phase 1; RSS_ONE=$(rss_kb VmHWM)
  reset_hwm; rss_phase "$RSS_CONC"; RSS_MOVED=$RESULT; RSS_PEAK=$(rss_kb VmHWM)
  say "  idle $RSS_IDLE kB, 1 download peak $RSS_ONE kB, $RSS_CONC downloads peak $RSS_PEAK kB ($RSS_MOVED bytes moved)"
fi

# --- (c) images.json latency with many versions --------------------------------------------
seed_versions() {
  n=$1
  if [ -n "$SEED_CMD" ]; then
    say "bench: seeding $n versions with $SEED_CMD (imgsrv stopped)"
    stop_pid "$IMGSRV_PID"; IMGSRV_PID=
    t0=$(now)
    # SEED_CMD may carry arguments, SEED_ARGS is the image count for seed_catalog: both split.
    # shellcheck disable=SC2086
    $SEED_CMD "$DATA" "$n" $SEED_ARGS >&2 || die "seeding with $SEED_CMD failed"
    say "  seeded in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
    start_imgsrv
    return
  fi
  # Fallback when examples/seed_catalog cannot be built: the API-only path, one
  # `imgsrv publish` per version (minutes for 10,000).
  say "bench: seeding $n versions over $CAT_IMAGES images with imgsrv publish ($SEED_JOBS jobs)"
  seed=$work/seed
  mkdir -p "$seed/meta"
  "$root/tests/fixtures/make-test-image" "$seed/base" --serial seed >/dev/null
  # One tiny rootfs shared by all versions; one metadata tarball per version (distinct
  # serials, so distinct Incus fingerprints).
  python3 - "$seed" "$n" "$CAT_IMAGES" <<'PY'
import io, lzma, sys, tarfile
seed, n, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jobs = open(f"{seed}/jobs", "w")
for i in range(1, n + 1):
    img, serial = f"bench-cat-{i % images:02d}", f"v{i:06d}"
    meta = (f'architecture: "x86_64"\ncreation_date: {1767225600 + i * 60}\nproperties:\n'
            f'  architecture: "x86_64"\n  description: "Benchcat {img} {serial}"\n'
            f'  os: "Benchcat"\n  release: "{img}"\n  serial: "{serial}"\n  variant: "default"\n'
            'templates: {}\n').encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo("metadata.yaml"); ti.size = len(meta); ti.mtime = 1767225600
        t.addfile(ti, io.BytesIO(meta))
    path = f"{seed}/meta/{serial}.tar.xz"
    with open(path, "wb") as f:
        f.write(lzma.compress(raw.getvalue(), preset=0))
    jobs.write(f"{img} {serial} {path}\n")
PY
  cat > "$seed/publish-one" <<EOF
#!/bin/sh
exec "$IMGSRV" publish --server "$IMG_URL" --ca "$CERT" --token-file "$DATA/admin.token" \\
  --key "$work/bench.key" --image "\$1" --version "\$2" "\$3" "$seed/base/rootfs.squashfs" >/dev/null
EOF
  chmod +x "$seed/publish-one"
  t0=$(now)
  xargs -P "$SEED_JOBS" -L 1 "$seed/publish-one" < "$seed/jobs" || die "seeding with imgsrv publish failed"
  say "  seeded in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"
}
if [ "$only" = all ]; then
  say "bench: (c) images.json with $VERSIONS versions"
  seed_versions "$VERSIONS"
  $CURL --cacert "$CERT" -o "$work/images.json" "$IMG_URL/streams/v1/images.json" || die "GET images.json failed"
  CAT_BYTES=$(wc -c < "$work/images.json" | tr -d ' ')
  CAT_FOUND=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(len(p.get("versions", {})) for p in d.get("products", {}).values()))' "$work/images.json")
  # The gzip body must be the identity document, compressed.
  $CURL --cacert "$CERT" -H 'Accept-Encoding: gzip' -D "$work/images.gz.hdr" -o "$work/images.json.gz" \
    "$IMG_URL/streams/v1/images.json" || die "GET images.json (gzip) failed"
  grep -qi '^content-encoding:[[:space:]]*gzip' "$work/images.gz.hdr" ||
    die "images.json with Accept-Encoding: gzip came back without Content-Encoding: gzip"
  python3 -c '
import gzip, sys
if gzip.decompress(open(sys.argv[1], "rb").read()) != open(sys.argv[2], "rb").read():
    sys.exit("the gzip images.json does not decode to the identity document")' \
    "$work/images.json.gz" "$work/images.json" || die "gzip images.json is not the identity document"
  images_json_latency "$IMG_URL" gzip
  # shellcheck disable=SC2086 # split "P50 P99 BYTES"
  set -- $RESULT; P50=$1 P99=$2 GZ_BYTES=$3
  images_json_latency "$IMG_URL" identity
  # shellcheck disable=SC2086 # split "P50 P99 BYTES"
  set -- $RESULT; P50ID=$1 P99ID=$2
  [ "$3" = "$CAT_BYTES" ] || die "identity images.json was $3 bytes, then $CAT_BYTES"
  set --
  say "  $CAT_FOUND versions; gzip ($GZ_BYTES bytes) p50 $P50 ms p99 $P99 ms; identity ($CAT_BYTES bytes) p50 $P50ID ms p99 $P99ID ms"
fi

# --- report ---------------------------------------------------------------------------------
# verdict runs in the main shell (not in $(...)) so that the miss count survives.
missed=0 V=''
verdict() { # TEST... -> V: PASS/FAIL, counting misses
  if "$@"; then V=PASS; else missed=$((missed + 1)); V=FAIL; fi
}
row() { printf '%-38s %-14s %-16s %-7s %-18s %s\n' "$@" | sed 's/[[:space:]]*$//'; }
note() { printf '%-38s %s\n' "$@"; }
echo
echo "imgsrv benchmark: artifact $SIZE_BYTES bytes (${SIZE_MIB} MiB), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "CPU: $CPU_MODEL, $(nproc) CPUs (client and servers share them)"
echo "TLS: nginx $NGX_CIPHER; imgsrv ${IMG_CIPHER:-n/a}"
row measure imgsrv baseline ratio target result
if [ "$only" = all ]; then
  r=$(ratio "$IMG_SINGLE" "$NGX_SINGLE"); verdict ge "$r" 0.9
  row "(a) download, 1 stream (MB/s)" "$IMG_SINGLE" "nginx $NGX_SINGLE" "$r" ">= 0.9x nginx" "$V"
  r=$(ratio "$IMG_PAR" "$NGX_PAR"); verdict ge "$r" 0.9
  row "(a) download, $CONC streams (MB/s)" "$IMG_PAR" "nginx $NGX_PAR" "$r" ">= 0.9x nginx" "$V"
  r=$(ratio "$INGEST_MBPS" "$OPENSSL_MBPS"); verdict ge "$r" 0.7
  row "(b) ingest, upload API (MB/s)" "$INGEST_MBPS" "sha256 $OPENSSL_MBPS" "$r" ">= 0.7x openssl" "$V"
  row "(b) ingest vs durable disk write" "$INGEST_MBPS" "dd/fsync $DD_MBPS" "$(ratio "$INGEST_MBPS" "$DD_MBPS")" "(reported)" ""
  row "(b) imgsrv publish, end-to-end (MB/s)" "$PUBLISH_MBPS" "sha256 $OPENSSL_MBPS" "$(ratio "$PUBLISH_MBPS" "$OPENSSL_MBPS")" "(reported)" ""
  verdict ge 5 "$P50"
  row "(c) images.json gzip p50 (ms)" "$P50" "-" "-" "<= 5 ms" "$V"
  row "(c) images.json gzip p99 (ms)" "$P99" "-" "-" "(reported)" ""
  row "(c) images.json identity p50/p99 (ms)" "$P50ID/$P99ID" "-" "-" "(reported)" ""
  note "    catalog" "$CAT_FOUND versions (asked for $VERSIONS); body $GZ_BYTES bytes gzip, $CAT_BYTES bytes identity"
  d=$(( (RSS_PEAK - RSS_IDLE) / 1024 )); verdict [ "$d" -le "$RSS_FLAT_MIB" ]
  row "(d) peak RSS, $RSS_CONC downloads (MiB)" "$((RSS_PEAK / 1024))" "idle $((RSS_IDLE / 1024))" "+$d" "+<= $RSS_FLAT_MIB MiB" "$V"
  note "    1 download peak" "$((RSS_ONE / 1024)) MiB; $RSS_CONC-download phase moved $((RSS_MOVED / 1048576)) MiB"
else
  row "(a) download, 1 stream (MB/s)" "n/a" "nginx $NGX_SINGLE" "-" ">= 0.9x nginx" ""
  row "(a) download, $CONC streams (MB/s)" "n/a" "nginx $NGX_PAR" "-" ">= 0.9x nginx" ""
  row "(b) ingest, upload API (MB/s)" "n/a" "sha256 $OPENSSL_MBPS" "-" ">= 0.7x openssl" ""
  row "(b) ingest vs durable disk write" "n/a" "dd/fsync $DD_MBPS" "-" "(reported)" ""
  note "(c) images.json, (d) RSS" "n/a (--nginx-only)"
fi
if [ "$missed" -gt 0 ]; then
  echo "bench: $missed target(s) missed"
  [ "$STRICT" = 1 ] && exit 3
fi
exit 0
