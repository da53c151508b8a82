#!/bin/sh
# flood.sh: imgsrv and Debian's nginx under the same connection flood, in one run.
#
# Usage: contrib/bench/flood.sh [--help]
#
# Each server in turn, alone on the machine with the flood client: FLOOD_IDLE_TCP TCP
# connections that never send a byte plus FLOOD_IDLE_TLS that finish the TLS handshake and
# then send nothing, re-opened as the server closes them, while FLOOD_REQUESTS normal
# requests (a new TLS 1.3 connection each, GET, Connection: close) are timed over
# FLOOD_SECONDS. imgsrv runs its default configuration (GET /streams/v1/index.json); nginx
# serves a static file of the same size with the same certificate, worker_processes auto,
# worker_connections FLOOD_NGINX_CONNECTIONS and client_header_timeout
# FLOOD_NGINX_HEADER_TIMEOUT (10s, imgsrv's handshake and header timeouts, so that both close
# and see re-opened the same flood; nginx's own default is 60s). Printed per server: requests answered, p50,
# p90 and max latency, what the flood held, the server's RSS (nginx: its workers, summed)
# and threads.
#
# Environment (defaults):
#   FLOOD_IDLE_TCP=3000 FLOOD_IDLE_TLS=3000 FLOOD_REQUESTS=20 FLOOD_SECONDS=25
#   FLOOD_TIMEOUT=5            seconds after which a request counts as unanswered
#   FLOOD_NGINX_CONNECTIONS=16384 FLOOD_NGINX_HEADER_TIMEOUT=10s
#   BENCH_IMGSRV=              imgsrv binary (default: cargo build --release, then use it)
#   BENCH_FLOOD=               the flood client (default: cargo build --release --example flood)
#   BENCH_DIR=, BENCH_KEEP=0   work directory, as for bench.sh
# Needs: nginx, curl, ss (iproute2); a hard file descriptor limit of 2 x the flood + 1,000.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BENCH_TAG=flood
# shellcheck source=contrib/bench/common.sh
. "$here/common.sh"

case ${1:-} in
  -h|--help) awk 'NR >= 2 && !/^#/ { exit } NR >= 2 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
  '') ;;
  *) echo "flood: unknown argument $1" >&2; exit 2 ;;
esac
die() { echo "flood: $*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

TCP=${FLOOD_IDLE_TCP:-3000}
TLS=${FLOOD_IDLE_TLS:-3000}
REQS=${FLOOD_REQUESTS:-20}
SECS=${FLOOD_SECONDS:-25}
TIMEOUT=${FLOOD_TIMEOUT:-5}
NGX_CONN=${FLOOD_NGINX_CONNECTIONS:-16384}
NGX_HEADER_TIMEOUT=${FLOOD_NGINX_HEADER_TIMEOUT:-10s}
for t in nginx curl ss; do command -v "$t" >/dev/null 2>&1 || die "$t is missing (contrib/install-test-deps.sh)"; done
need=$((2 * (TCP + TLS) + 1000))
# (dash and bash both have ulimit -n and -H)
# shellcheck disable=SC3045
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck disable=SC3045
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need" ] ||
  die "the file descriptor limit is too low, the flood needs $need: raise the hard limit (ulimit -Hn)"

if [ -z "${BENCH_IMGSRV:-}" ] || [ -z "${BENCH_FLOOD:-}" ]; then
  say "flood: cargo build --release (imgsrv and examples/flood)"
  (cd "$root" && cargo build --release --locked -q && cargo build --release --locked -q --example flood) ||
    die "cargo build --release failed"
fi
IMGSRV=${BENCH_IMGSRV:-${CARGO_TARGET_DIR:-$root/target}/release/imgsrv}
FLOOD=${BENCH_FLOOD:-${CARGO_TARGET_DIR:-$root/target}/release/examples/flood}

bench_work_dir imgsrv-flood
bench_traps

# --- imgsrv, default configuration ------------------------------------------------------
DATA=$work/data
"$IMGSRV" init --data "$DATA" >/dev/null
CERT=$DATA/tls/cert.pem KEY=$DATA/tls/key.pem
PORT=$(free_port)
"$IMGSRV" serve --data "$DATA" --listen "127.0.0.1:$PORT" > "$work/imgsrv.log" 2>&1 &
IMGSRV_PID=$!
wait_https "https://localhost:$PORT/healthz" 204 "$IMGSRV_PID" "$work/imgsrv.log"
size=$(curl -sS --cacert "$CERT" "https://localhost:$PORT/streams/v1/index.json" | wc -c)
say "flood: imgsrv $("$IMGSRV" --version) on 127.0.0.1:$PORT, $TCP idle TCP + $TLS TLS-idle, $REQS requests over ${SECS}s"
IMG_OUT=$("$FLOOD" "127.0.0.1:$PORT" "$CERT" --idle-tcp "$TCP" --idle-tls "$TLS" --requests "$REQS" \
  --seconds "$SECS" --timeout "$TIMEOUT" --path /streams/v1/index.json --pid "$IMGSRV_PID" 2>"$work/imgsrv-flood.err") || true
stop_pid "$IMGSRV_PID"; IMGSRV_PID=

# --- nginx, same certificate, a static file of the same size -----------------------------
NGX=$work/nginx
mkdir -p "$NGX/www"
head -c "$size" /dev/zero | tr '\0' 'x' > "$NGX/www/index.json"
NGX_PORT=$(free_port)
write_nginx_conf "$NGX" "$NGX_PORT" "$CERT" "$KEY" "$NGX/www" "client_header_timeout $NGX_HEADER_TIMEOUT;" ||
  die "nginx configuration failed"
sed -i "s/worker_connections 1024;/worker_connections $NGX_CONN;/; s/^worker_processes auto;/worker_processes auto;\nworker_rlimit_nofile $((NGX_CONN * 2));/" "$NGX/nginx.conf"
nginx -c "$NGX/nginx.conf" -e "$NGX/error.log" > "$NGX/stdout.log" 2>&1 &
NGINX_PID=$!
wait_https "https://localhost:$NGX_PORT/index.json" 200 "$NGINX_PID" "$NGX/error.log"
workers=$(pgrep -P "$(cat "$NGX/nginx.pid")" | paste -sd, -)
say "flood: $(nginx -v 2>&1 | sed 's|.*/|nginx |') on 127.0.0.1:$NGX_PORT (workers $workers, client_header_timeout $NGX_HEADER_TIMEOUT)"
NGX_OUT=$("$FLOOD" "127.0.0.1:$NGX_PORT" "$CERT" --idle-tcp "$TCP" --idle-tls "$TLS" --requests "$REQS" \
  --seconds "$SECS" --timeout "$TIMEOUT" --path /index.json --pid "$workers" 2>"$work/nginx-flood.err") || true
stop_pid "$NGINX_PID"; NGINX_PID=

printf '\n%s idle TCP + %s TLS-idle connections (re-opened as closed), %s requests over %ss, %s cores (%s)\n' \
  "$TCP" "$TLS" "$REQS" "$SECS" "$(nproc)" "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
printf 'imgsrv  %s\n' "${IMG_OUT:-no result (see $work/imgsrv-flood.err)}"
printf 'nginx   %s\n' "${NGX_OUT:-no result (see $work/nginx-flood.err)}"
for f in "$work/imgsrv-flood.err" "$work/nginx-flood.err"; do
  [ -s "$f" ] && sed "s|^|$(basename "$f" .err): |" "$f" >&2
done
exit 0
