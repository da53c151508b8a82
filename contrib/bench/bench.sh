#!/bin/sh
# bench.sh: imgsrv's performance figures next to their baselines, in one run on one file.
#
# Usage: contrib/bench/bench.sh [--nginx-only] [--help]
#
#   (a) download of a BENCH_SIZE_MIB artifact over TLS 1.3: imgsrv vs nginx (Debian's)
#       serving the same file with the same certificate, 1 stream and BENCH_CONCURRENCY
#       concurrent streams (curl -o /dev/null), MB/s (10^6 bytes/s)
#   (b) ingest: `imgsrv publish` (upload + hash + store + publish) vs `openssl dgst -sha256`
#   (c) /streams/v1/images.json latency p50/p99 with BENCH_VERSIONS published versions
#   (d) imgsrv's peak RSS (VmHWM) during BENCH_RSS_CONCURRENCY concurrent downloads
#
# --nginx-only  measure only what needs no imgsrv: nginx downloads and the openssl hash rate.
#
# Environment (defaults):
#   BENCH_SIZE_MIB=1024        artifact size (a padded test image rootfs); 64 for a quick run
#   BENCH_CONCURRENCY=16       concurrent streams for (a)
#   BENCH_REPEAT=3             single-stream runs per server (the median is reported)
#   BENCH_VERSIONS=10000       published versions for (c), spread over BENCH_CATALOG_IMAGES=10
#   BENCH_LAT_REQUESTS=500     images.json requests per measurement (one keep-alive connection)
#   BENCH_SEED_JOBS=2          parallel `imgsrv publish` processes when seeding (c)
#   BENCH_SEED_CMD=            faster seeding hook: run as `$BENCH_SEED_CMD DATA_DIR N` while
#                              imgsrv is stopped; it must leave N published versions
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

usage() { sed -n '4,33p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
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
RSS_CONC=${BENCH_RSS_CONCURRENCY:-64}
RSS_SECONDS=${BENCH_RSS_SECONDS:-20}
RSS_FLAT_MIB=${BENCH_RSS_FLAT_MIB:-64}
STRICT=${BENCH_STRICT:-0}
for v in SIZE_MIB CONC REPEAT VERSIONS CAT_IMAGES LAT_N SEED_JOBS RSS_CONC RSS_SECONDS RSS_FLAT_MIB; do
  eval "val=\$$v"
  # shellcheck disable=SC2154 # val is set by the eval above
  case $val in ''|*[!0-9]*|0) die "BENCH_$v must be a positive whole number (got '$val')" ;; esac
done

tools="curl openssl nginx python3 ss shuf awk sort timeout"
[ "$only" = all ] && tools="$tools minisign"
for t in $tools; do command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"; done

# --- work dir, background processes, cleanup ---------------------------------------------
if [ -n "${BENCH_DIR:-}" ]; then
  mkdir -p "$BENCH_DIR"; work=$(cd "$BENCH_DIR" && pwd); own_work=
else
  work=$(mktemp -d "${TMPDIR:-/var/tmp}/imgsrv-bench.XXXXXX"); own_work=1
fi
NGINX_PID='' IMGSRV_PID=''
stop_pid() { # PID: TERM, wait up to 10 s, KILL
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null || return 0
  i=0
  while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  rc=$?
  trap - EXIT INT TERM
  stop_pid "$NGINX_PID"
  stop_pid "$IMGSRV_PID"
  # curl clients still running (after an interruption) are our children: end them.
  for p in $(jobs -p 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
  if [ "${BENCH_KEEP:-0}" = 1 ] || [ -z "$own_work" ]; then
    say "bench: work directory kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers --------------------------------------------------------------------------------
now() { date +%s.%N; }
free_port() {
  while :; do
    p=$(shuf -i 20000-60999 -n 1)
    [ -z "$(ss -Htln "sport = :$p")" ] && { echo "$p"; return; }
  done
}
# mbps BYTES SECONDS
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s <= 0) s = 1e-9; printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "n/a"; else printf "%.2f", a / b }'; }
# ge A B -> status 0 when A >= B (floats)
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 >= b + 0) }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else print v[int((NR + 1) / 2)] }'; }
CURL="curl --http1.1 -sS"

wait_https() { # URL EXPECTED_CODE PID LOG
  i=0
  while [ $i -lt 200 ]; do
    kill -0 "$3" 2>/dev/null || { say "bench: server exited; log:"; tail -n 40 "$4" >&2; exit 1; }
    code=$($CURL -o /dev/null -w '%{http_code}' --cacert "$CERT" "$1" 2>/dev/null) || code=000
    [ "$code" = "$2" ] && return 0
    sleep 0.1; i=$((i + 1))
  done
  say "bench: $1 did not answer $2 in 20 s (last: $code); log:"; tail -n 40 "$4" >&2; exit 1
}

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
say "bench: work dir $work; artifact ${SIZE_MIB} MiB; $(nproc) CPUs"
say "bench: building the test image (make-test-image --pad-mib $SIZE_MIB)"
"$root/tests/fixtures/make-test-image" "$work/img" --serial 20260101_0000 --pad-mib "$SIZE_MIB"
META=$work/img/incus.tar.xz
ROOTFS=$work/img/rootfs.squashfs
SIZE_BYTES=$(wc -c < "$ROOTFS" | tr -d ' ')

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

# --- imgsrv: binary, data dir, certificate ---------------------------------------------------
if [ "$only" = all ]; then
  if [ -z "${BENCH_IMGSRV:-}" ]; then
    say "bench: cargo build --release"
    (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
    BENCH_IMGSRV=${CARGO_TARGET_DIR:-$root/target}/release/imgsrv
  fi
  IMGSRV=$BENCH_IMGSRV
  [ -x "$IMGSRV" ] || die "imgsrv binary $IMGSRV not found"
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
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat > "$NGX/nginx.conf" <<EOF
# Debian's nginx as a plain static file server: TLS 1.3 only, same cert as imgsrv.
$user_line
daemon off;
worker_processes auto;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 65;
  default_type application/octet-stream;
  client_body_temp_path $NGX/tmp/body;
  proxy_temp_path $NGX/tmp/proxy;
  fastcgi_temp_path $NGX/tmp/fastcgi;
  uwsgi_temp_path $NGX/tmp/uwsgi;
  scgi_temp_path $NGX/tmp/scgi;
  server {
    listen 127.0.0.1:$NGX_PORT ssl;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.3;
    root $NGX/www;
    location = /healthz { return 204; }
  }
}
EOF
nginx -t -q -c "$NGX/nginx.conf" -e "$NGX/error.log" || die "nginx -t failed: $(cat "$NGX/error.log")"
nginx -c "$NGX/nginx.conf" -e "$NGX/error.log" > "$NGX/stdout.log" 2>&1 &
NGINX_PID=$!
NGX_URL=https://127.0.0.1:$NGX_PORT
wait_https "$NGX_URL/healthz" 204 "$NGINX_PID" "$NGX/error.log"
say "bench: nginx $(nginx -v 2>&1 | sed 's|.*/||') on $NGX_URL ($(cipher "$NGX_URL/artifact.squashfs"))"

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

INGEST_MBPS='' IMG_SINGLE='' IMG_PAR='' P50='' P99='' P50GZ='' P99GZ='' CAT_BYTES='' CAT_FOUND=''
RSS_IDLE='' RSS_ONE='' RSS_PEAK='' RSS_MOVED=''
if [ "$only" = all ]; then
  start_imgsrv
  say "bench: imgsrv on $IMG_URL ($(cipher "$IMG_URL/healthz"))"
  say "bench: ingest: imgsrv publish of $(wc -c < "$META" | tr -d ' ') + $SIZE_BYTES bytes"
  t0=$(now)
  publish bench 20260101_0000 "$META" "$ROOTFS" > "$work/publish.out" 2>&1 ||
    { cat "$work/publish.out" >&2; die "imgsrv publish failed"; }
  t1=$(now)
  INGEST_MBPS=$(mbps "$(($(wc -c < "$META") + SIZE_BYTES))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  say "  imgsrv publish: $INGEST_MBPS MB/s"
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
    say "bench: seeding $n versions with BENCH_SEED_CMD (imgsrv stopped)"
    stop_pid "$IMGSRV_PID"; IMGSRV_PID=
    $SEED_CMD "$DATA" "$n" || die "BENCH_SEED_CMD failed"
    start_imgsrv
    return
  fi
  # TODO(bench): publishing N versions one `imgsrv publish` at a time is the slow but
  # API-only path (minutes for 10,000). Point BENCH_SEED_CMD at a bulk seeder (e.g. a
  # catalog-level helper of imgsrv) once one exists.
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
latency() { # EXTRA_CURL_ARG... -> RESULT: "p50 p99" in ms, LAT_N requests, one connection
  cfg=$work/lat.cfg
  : > "$cfg"
  i=0
  while [ $i -le "$LAT_N" ]; do
    printf 'url = "%s/streams/v1/images.json"\noutput = "/dev/null"\n' "$IMG_URL" >> "$cfg"
    i=$((i + 1))
  done
  $CURL --cacert "$CERT" "$@" -K "$cfg" -w '%{http_code} %{time_total}\n' > "$work/lat.out" ||
    die "images.json requests failed"
  awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/lat.out" || die "images.json answered non-200"
  # The first request pays for the TLS handshake: drop it.
  RESULT=$(tail -n +2 "$work/lat.out" | awk '{ print $2 * 1000 }' | sort -n | awk '
    { v[NR] = $1 }
    END { i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
          printf "%.2f %.2f", v[i50], v[i99] }')
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
  latency; P50=${RESULT% *} P99=${RESULT#* }
  latency --compressed; P50GZ=${RESULT% *} P99GZ=${RESULT#* }
  say "  $CAT_FOUND versions, $CAT_BYTES bytes; identity p50 $P50 ms p99 $P99 ms; gzip p50 $P50GZ ms p99 $P99GZ ms"
fi

# --- report ---------------------------------------------------------------------------------
missed=0
verdict() { # OK? -> PASS/FAIL, counting misses
  if "$@"; then echo PASS; else missed=$((missed + 1)); echo FAIL; fi
}
na() { echo "n/a"; }
echo
echo "imgsrv benchmark: artifact $SIZE_BYTES bytes (${SIZE_MIB} MiB), $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
printf '%-34s %-14s %-14s %-7s %-20s %s\n' measure imgsrv baseline ratio target result
if [ "$only" = all ]; then
  r=$(ratio "$IMG_SINGLE" "$NGX_SINGLE")
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(a) download, 1 stream (MB/s)" "$IMG_SINGLE" "nginx $NGX_SINGLE" "$r" ">= 0.9x nginx" "$(verdict ge "$r" 0.9)"
  r=$(ratio "$IMG_PAR" "$NGX_PAR")
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(a) download, $CONC streams (MB/s)" "$IMG_PAR" "nginx $NGX_PAR" "$r" ">= 0.9x nginx" "$(verdict ge "$r" 0.9)"
  r=$(ratio "$INGEST_MBPS" "$OPENSSL_MBPS")
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(b) ingest (MB/s)" "$INGEST_MBPS" "sha256 $OPENSSL_MBPS" "$r" ">= 0.7x openssl" "$(verdict ge "$r" 0.7)"
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(c) images.json p50 (ms)" "$P50" "-" "-" "<= 5 ms" "$(verdict ge 5 "$P50")"
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(c) images.json p99 (ms)" "$P99" "-" "-" "(reported)" ""
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(c) images.json gzip p50/p99 (ms)" "$P50GZ/$P99GZ" "-" "-" "(reported)" ""
  printf '%-34s %s\n' "    catalog" "$CAT_FOUND versions in images.json ($CAT_BYTES bytes); asked for $VERSIONS"
  d=$(( (RSS_PEAK - RSS_IDLE) / 1024 ))
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(d) peak RSS, $RSS_CONC downloads (MiB)" "$((RSS_PEAK / 1024))" "idle $((RSS_IDLE / 1024))" "+$d" "flat: +<= $RSS_FLAT_MIB MiB" "$(verdict [ "$d" -le "$RSS_FLAT_MIB" ])"
  printf '%-34s %s\n' "    1 download peak" "$((RSS_ONE / 1024)) MiB; $RSS_CONC-download phase moved $((RSS_MOVED / 1048576)) MiB"
else
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(a) download, 1 stream (MB/s)" "$(na)" "nginx $NGX_SINGLE" "-" ">= 0.9x nginx" ""
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(a) download, $CONC streams (MB/s)" "$(na)" "nginx $NGX_PAR" "-" ">= 0.9x nginx" ""
  printf '%-34s %-14s %-14s %-7s %-20s %s\n' "(b) ingest (MB/s)" "$(na)" "sha256 $OPENSSL_MBPS" "-" ">= 0.7x openssl" ""
  printf '%-34s %s\n' "(c) images.json, (d) RSS" "n/a (--nginx-only)"
fi
if [ "$missed" -gt 0 ]; then
  echo "bench: $missed target(s) missed"
  [ "$STRICT" = 1 ] && exit 3
fi
exit 0
