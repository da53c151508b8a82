#!/bin/sh
# tlog.sh: the transparency log at scale (issue 11): publish latency with the log at 10,
# 10,000 and 1,000,000 entries, the tlog-proof's latency, and the hash tiles served by
# imgsrv next to nginx serving the same files, in one run.
#
# Usage: contrib/bench/tlog.sh [--help]
#
#   For each size in TLOG_BENCH_SIZES: a fresh data directory, its log filled to that
#   size (examples/seed_log: synthetic entries through the catalog's own append), an
#   `imgsrv serve` on 127.0.0.1, then TLOG_BENCH_PUBLISHES publishes of one small image
#   (`imgsrv publish --server`, a new version each time: the blobs are stored once, so
#   what is timed is the catalog, the log's append and the client), each followed by one
#   GET of its manifest.tlog-proof (the first after a publish signs the new checkpoint).
#   Then TLOG_BENCH_PROOFS requests of the newest version's tlog-proof on one keep-alive
#   connection (curl): p50 and p99. At the largest size, every full level-0 hash tile
#   (8 KiB each) is fetched from imgsrv and from nginx serving the same bytes as files
#   (TLS 1.3 both, one keep-alive connection each, the best of 3 runs).
#   Figures are printed; goals are shown, not asserted (BENCH_STRICT=1: exit 3 on a miss).
#
# Environment (defaults):
#   TLOG_BENCH_SIZES="10 10000 1000000"  log sizes (entries before the publishes)
#   TLOG_BENCH_PUBLISHES=20              publishes per size (the median is reported)
#   TLOG_BENCH_PROOFS=200                proof requests per size
#   BENCH_IMGSRV=                        imgsrv binary (default: cargo build --release)
#   BENCH_SEED_CMD=                      seeder (default: examples/seed_log, built --release)
#   BENCH_DIR=                           work directory (default: a new one under ${TMPDIR:-/var/tmp})
#   BENCH_KEEP=0                         1 keeps the work directory
#   BENCH_STRICT=0                       1: exit 3 when a goal is missed
# Needs: curl, nginx, minisign, ss (iproute2), and make-test-image's tools.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=tlog-bench
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

usage() { awk 'NR >= 4 && !/^#/ { exit } NR >= 4 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-0}"; }
die() { echo "tlog-bench: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

case ${1:-} in
  -h|--help) usage 0 ;;
  '') ;;
  *) echo "tlog-bench: unknown argument $1" >&2; usage 2 >&2 ;;
esac

SIZES=${TLOG_BENCH_SIZES:-10 10000 1000000}
PUBLISHES=${TLOG_BENCH_PUBLISHES:-20}
PROOFS=${TLOG_BENCH_PROOFS:-200}
check_positive TLOG_BENCH_ PUBLISHES PROOFS
for n in $SIZES; do
  case $n in ''|*[!0-9]*) die "TLOG_BENCH_SIZES: $n is not a whole number" ;; esac
done
for t in curl nginx minisign ss shuf awk sort; do
  command -v "$t" >/dev/null 2>&1 || die "$t not found (run contrib/install-test-deps.sh)"
done
CURL="curl --http1.1 -sS"

bench_work_dir imgsrv-tlog-bench
bench_traps

target=${CARGO_TARGET_DIR:-$root/target}
if [ -z "${BENCH_IMGSRV:-}" ]; then
  say "tlog-bench: cargo build --release"
  (cd "$root" && cargo build --release --locked -q) || die "cargo build --release failed"
  BENCH_IMGSRV=$target/release/imgsrv
fi
if [ -z "${BENCH_SEED_CMD:-}" ]; then
  say "tlog-bench: cargo build --release --example seed_log"
  (cd "$root" && cargo build --release --locked -q --example seed_log) || die "building examples/seed_log failed"
  BENCH_SEED_CMD=$target/release/examples/seed_log
fi
IMGSRV=$BENCH_IMGSRV

"$root/tests/fixtures/make-test-image" "$work/img" --serial 20260101_0000 >/dev/null
META=$work/img/incus.tar.xz
ROOT=$work/img/rootfs.squashfs
minisign -G -W -f -p "$work/key.pub" -s "$work/key.sec" >/dev/null

# latency URL N -> RESULT "p50 p99" in ms of N GETs of URL on one keep-alive connection
# (trusting $CERT); the first (the handshake) is dropped; every answer must be 200.
latency() {
  : > "$work/lat.cfg"
  _i=0
  while [ $_i -le "$2" ]; do
    printf 'url = "%s"\noutput = "/dev/null"\n' "$1" >> "$work/lat.cfg"
    _i=$((_i + 1))
  done
  $CURL --cacert "$CERT" -K "$work/lat.cfg" -w '%{http_code} %{time_total}\n' > "$work/lat.out" ||
    die "requests for $1 failed"
  awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/lat.out" || die "$1 answered non-200"
  RESULT=$(tail -n +2 "$work/lat.out" | awk '{ print $2 * 1000 }' | sort -n | awk '
    { v[NR] = $1 }
    END { printf "%.2f %.2f", v[int(NR * 0.50 + 0.999999)], v[int(NR * 0.99 + 0.999999)] }')
}

largest=0
for n in $SIZES; do [ "$n" -gt "$largest" ] && largest=$n; done
: > "$work/rows"
for n in $SIZES; do
  data=$work/data-$n
  "$IMGSRV" init --data "$data" >/dev/null
  "$IMGSRV" key add --data "$data" --name bench "$work/key.pub" >/dev/null
  t0=$(now)
  size=$("$BENCH_SEED_CMD" "$data" "$n") || die "seeding $n entries failed"
  t1=$(now)
  say "tlog-bench: log of $size entries seeded in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
  port=$(free_port)
  "$IMGSRV" serve --data "$data" --listen "127.0.0.1:$port" --metrics-listen "" >"$work/serve-$n.log" 2>&1 &
  IMGSRV_PID=$!
  CERT=$data/tls/cert.pem
  url=https://127.0.0.1:$port
  wait_https "$url/healthz" 204 "$IMGSRV_PID" "$work/serve-$n.log"
  : > "$work/publish.ms"; : > "$work/first-proof.ms"
  i=0
  while [ "$i" -lt "$PUBLISHES" ]; do
    i=$((i + 1))
    t0=$(now)
    "$IMGSRV" publish --server "$url" --ca "$CERT" --token-file "$data/admin.token" \
      --key "$work/key.sec" --image bench --version "$i" "$META" "$ROOT" >/dev/null ||
      die "imgsrv publish failed (log: $work/serve-$n.log)"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) * 1000 }' >> "$work/publish.ms"
    $CURL --cacert "$CERT" -o "$work/proof" -w '%{http_code} %{time_total}\n' \
      "$url/v1/images/bench/versions/$i/manifest.tlog-proof" > "$work/first.out" ||
      die "GET the tlog-proof failed"
    read -r code secs < "$work/first.out"
    [ "$code" = 200 ] || die "the tlog-proof of bench@$i answered $code: $(cat "$work/proof")"
    awk -v s="$secs" 'BEGIN { printf "%.2f\n", s * 1000 }' >> "$work/first-proof.ms"
  done
  latency "$url/v1/images/bench/versions/$PUBLISHES/manifest.tlog-proof" "$PROOFS"
  # shellcheck disable=SC2086 # split "P50 P99"
  set -- $RESULT
  pub=$(median < "$work/publish.ms")
  first=$(median < "$work/first-proof.ms")
  printf '%s %s %s %s %s %s\n' "$n" "$size" "$pub" "$first" "$1" "$2" >> "$work/rows"
  say "  $size entries: publish median $pub ms, first proof $first ms, proof p50 $1 ms p99 $2 ms"
  if [ "$n" = "$largest" ]; then
    # the tiles: every full level-0 tile of the tree, from imgsrv, stored as files
    total=$(awk 'END { print $2 + 0 }' "$work/rows")
    tiles=$((total / 256))
    [ "$tiles" -gt 0 ] || die "the largest log ($total entries) has no full tile: use a larger size"
    www=$work/www
    : > "$work/tiles.cfg"; : > "$work/tiles-ngx.cfg"
    t=0
    while [ "$t" -lt "$tiles" ]; do
      p=$(awk -v n="$t" 'BEGIN {
        s = sprintf("%03d", n % 1000); n = int(n / 1000)
        while (n > 0) { s = sprintf("x%03d/%s", n % 1000, s); n = int(n / 1000) }
        print "tile/0/" s }')
      mkdir -p "$www/log/$(dirname "$p")"
      printf 'url = "%s/log/%s"\noutput = "%s/log/%s"\n' "$url" "$p" "$www" "$p" >> "$work/tiles.cfg"
      t=$((t + 1))
    done
    $CURL --cacert "$CERT" -K "$work/tiles.cfg" -w '%{http_code}\n' > "$work/tiles.codes" || die "fetching the tiles failed"
    awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/tiles.codes" || die "a tile answered non-200"
    bytes=$((tiles * 8192))
    [ "$(cat "$www"/log/tile/0/* "$www"/log/tile/0/*/* 2>/dev/null | wc -c)" -ge "$bytes" ] ||
      say "  (note: fewer tile bytes on disk than $bytes)"
    NGX=$work/nginx
    NGX_PORT=$(free_port)
    write_nginx_conf "$NGX" "$NGX_PORT" "$data/tls/cert.pem" "$data/tls/key.pem" "$www" \
      "location = /healthz { return 204; }" || die "nginx configuration failed"
    nginx -c "$NGX/nginx.conf" -e "$NGX/error.log" > "$NGX/stdout.log" 2>&1 &
    NGINX_PID=$!
    ngx=https://127.0.0.1:$NGX_PORT
    wait_https "$ngx/healthz" 204 "$NGINX_PID" "$NGX/error.log"
    sed "s|$url|$ngx|; s|^output = .*|output = \"/dev/null\"|" "$work/tiles.cfg" > "$work/tiles-ngx.cfg"
    sed "s|^output = .*|output = \"/dev/null\"|" "$work/tiles.cfg" > "$work/tiles-img.cfg"
    best_img=0 best_ngx=0
    for run in 1 2 3; do
      for who in img ngx; do
        t0=$(now)
        $CURL --cacert "$CERT" -K "$work/tiles-$who.cfg" -w '%{http_code}\n' > "$work/run.codes" ||
          die "fetching the tiles ($who) failed"
        t1=$(now)
        awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/run.codes" || die "a tile ($who) answered non-200"
        rate=$(awk -v n="$tiles" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
        say "  tiles run $run $who: $rate tiles/s"
        if [ "$who" = img ]; then ge "$rate" "$best_img" && best_img=$rate; else ge "$rate" "$best_ngx" && best_ngx=$rate; fi
      done
    done
    echo "$tiles $best_img $best_ngx" > "$work/tiles.result"
    stop_pid "$NGINX_PID"; NGINX_PID=
  fi
  stop_pid "$IMGSRV_PID"; IMGSRV_PID=
  rm -rf "$data"
done

# --- report ---------------------------------------------------------------------------------
missed=0
echo "imgsrv transparency-log benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPU(s), $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf '%-44s %12s %12s %12s %10s\n' "log entries (seeded + publishes)" "publish ms" "1st proof ms" "proof p50" "proof p99"
while read -r n size pub first p50 p99; do
  printf '%-44s %12s %12s %12s %10s\n' "$size (+$PUBLISHES)" "$pub" "$first" "$p50" "$p99"
done < "$work/rows"
small=$(awk 'NR == 1 { print $3 }' "$work/rows")
big=$(awk 'END { print $3 }' "$work/rows")
bigp50=$(awk 'END { print $5 }' "$work/rows")
bigsize=$(awk 'END { print $2 }' "$work/rows")
echo "publish at $bigsize / at the smallest: $(ratio "$big" "$small")x (goal: flat, 1.00x)"
if ge 5 "$bigp50"; then v=met; else v=missed; missed=$((missed + 1)); fi
echo "proof p50 at $bigsize entries: $bigp50 ms (goal <= 5 ms at 1,000,000: $v)"
if [ -s "$work/tiles.result" ]; then
  read -r tiles img ngx < "$work/tiles.result"
  echo "level-0 tiles ($tiles of 8 KiB, one keep-alive connection, best of 3): imgsrv $img tiles/s ($(mbps $((img * 8192)) 1) MB/s), nginx files $ngx tiles/s ($(mbps $((ngx * 8192)) 1) MB/s): $(ratio "$img" "$ngx")x nginx"
fi
if [ "$missed" -gt 0 ] && [ "${BENCH_STRICT:-0}" = 1 ]; then exit 3; fi
exit 0
