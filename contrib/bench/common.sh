# shellcheck shell=sh
# Sourced by the benchmark scripts: the work directory and the exit trap, small
# measuring helpers (images.json latency too: the scripts define die and say), stopping background servers, and Debian's nginx as a plain
# static file server over TLS 1.3, for comparisons run on the same machine.
# The scripts set BENCH_TAG (their name in messages) before sourcing this file.

# bench_work_dir PREFIX: sets $work to $BENCH_DIR (created if needed) or to a new directory
# ${TMPDIR:-/var/tmp}/PREFIX.XXXXXX, which the exit trap removes ($own_work=1) unless
# BENCH_KEEP=1.
bench_work_dir() {
  if [ -n "${BENCH_DIR:-}" ]; then
    mkdir -p "$BENCH_DIR"; work=$(cd "$BENCH_DIR" && pwd); own_work=
  else
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/$1.XXXXXX"); own_work=1
  fi
}

# bench_traps: on exit (INT and TERM exit with 130 and 143 first) stop $NGINX_PID and
# $IMGSRV_PID, end the background jobs still running (curl clients after an
# interruption), and remove or keep the work directory.
NGINX_PID='' IMGSRV_PID=''
# shellcheck disable=SC2317 # invoked by the EXIT trap
bench_cleanup() {
  rc=$?
  trap - EXIT INT TERM
  stop_pid "$NGINX_PID"
  stop_pid "$IMGSRV_PID"
  for p in $(jobs -p 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
  if [ "${BENCH_KEEP:-0}" = 1 ] || [ -z "$own_work" ]; then
    printf '%s: work directory kept: %s\n' "$BENCH_TAG" "$work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
bench_traps() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

now() { date +%s.%N; }
# free_port: a TCP port nothing listens on at this moment
free_port() {
  while :; do
    p=$(shuf -i 20000-60999 -n 1)
    [ -z "$(ss -Htln "sport = :$p")" ] && { echo "$p"; return; }
  done
}
# mbps BYTES SECONDS: 10^6 bytes per second
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s <= 0) s = 1e-9; printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "n/a"; else printf "%.2f", a / b }'; }
# ge A B -> status 0 when A >= B (floats)
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 >= b + 0) }'; }
# median: of the numbers on stdin, one a line (0 for none)
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else print v[int((NR + 1) / 2)] }'; }

# check_positive PREFIX NAME[:SUFFIX]...: each shell variable NAME holds a positive whole
# number; else die naming the setting PREFIX+SUFFIX (SUFFIX defaults to NAME).
check_positive() {
  _prefix=$1; shift
  for _v in "$@"; do
    eval "_val=\$${_v%%:*}"
    # shellcheck disable=SC2154 # _val is set by the eval above
    case $_val in ''|*[!0-9]*|0) die "$_prefix${_v#*:} must be a positive whole number (got '$_val')" ;; esac
  done
}

# images_json_latency BASE_URL ENCODING(gzip|identity) -> RESULT: "p50 p99 bytes" in ms of
# $LAT_N requests for BASE_URL/streams/v1/images.json on one keep-alive connection
# (trusting $CERT, with $CURL; files in $work). gzip is what Incus (Go's HTTP client) asks
# for: the body is received, not decoded (no --compressed); identity sends no
# Accept-Encoding at all. Every response must be 200 in the expected encoding. The first
# request pays for the TLS handshake (and a rebuilt projection) and is dropped.
images_json_latency() {
  _cfg=$work/lat.cfg
  : > "$_cfg"
  _lat_n=0
  while [ $_lat_n -le "$LAT_N" ]; do
    printf 'url = "%s/streams/v1/images.json"\noutput = "/dev/null"\n' "$1" >> "$_cfg"
    _lat_n=$((_lat_n + 1))
  done
  _want='[]'
  if [ "$2" = gzip ]; then set -- -H 'Accept-Encoding: gzip'; _want='[gzip]'; else set --; fi
  $CURL --cacert "$CERT" "$@" -K "$_cfg" \
    -w '%{http_code} %{time_total} %{size_download} %{num_connects} [%header{content-encoding}]\n' \
    > "$work/lat.out" || die "images.json requests failed"
  awk '$1 != 200 { bad++ } END { exit bad > 0 }' "$work/lat.out" || die "images.json answered non-200"
  awk -v w="$_want" '$5 != w { bad++ } END { exit bad > 0 }' "$work/lat.out" ||
    die "images.json: Content-Encoding is not ${_want} on every response (first: $(head -n 1 "$work/lat.out"))"
  _conns=$(awk '{ s += $4 } END { print s }' "$work/lat.out")
  [ "$_conns" = 1 ] || say "  (note: $_conns connections instead of 1 keep-alive connection)"
  _bytes=$(awk 'NR == 1 { print $3 }' "$work/lat.out")
  # shellcheck disable=SC2034 # the caller reads RESULT
  RESULT=$(tail -n +2 "$work/lat.out" | awk '{ print $2 * 1000 }' | sort -n | awk -v b="$_bytes" '
    { v[NR] = $1 }
    END { i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
          printf "%.2f %.2f %s", v[i50], v[i99], b }')
}

# (these functions name their counters _wait_n and _stop_n: the scripts loop over i)
# wait_https URL EXPECTED_CODE PID LOG: waits (20 s at most) until URL answers EXPECTED_CODE
# over HTTPS trusting $CERT; exits, showing the end of LOG, if PID exits or time runs out.
wait_https() {
  _wait_n=0
  while [ $_wait_n -lt 200 ]; do
    kill -0 "$3" 2>/dev/null || { echo "$BENCH_TAG: server exited; log:" >&2; tail -n 40 "$4" >&2; exit 1; }
    code=$(curl --http1.1 -sS -o /dev/null -w '%{http_code}' --cacert "$CERT" "$1" 2>/dev/null) || code=000
    [ "$code" = "$2" ] && return 0
    sleep 0.1; _wait_n=$((_wait_n + 1))
  done
  echo "$BENCH_TAG: $1 did not answer $2 in 20 s (last: $code); log:" >&2; tail -n 40 "$4" >&2; exit 1
}

# stop_pid PID: TERM, wait up to 10 s, then KILL.
stop_pid() {
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null || return 0
  _stop_n=0
  while kill -0 "$1" 2>/dev/null && [ $_stop_n -lt 100 ]; do sleep 0.1; _stop_n=$((_stop_n + 1)); done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# write_nginx_conf DIR PORT CERT KEY ROOT [EXTRA_SERVER_DIRECTIVES]
# Writes DIR/nginx.conf (pid, logs and temp files under DIR) serving ROOT on
# 127.0.0.1:PORT with only TLS 1.3, and checks it with `nginx -t`.
write_nginx_conf() {
  _dir=$1 _port=$2 _cert=$3 _key=$4 _root=$5 _extra=${6:-}
  mkdir -p "$_dir/tmp"
  _user=
  [ "$(id -u)" = 0 ] && _user="user root;"
  cat > "$_dir/nginx.conf" <<CONF
$_user
daemon off;
worker_processes auto;
pid $_dir/nginx.pid;
error_log $_dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 65;
  default_type application/octet-stream;
  client_body_temp_path $_dir/tmp/body;
  proxy_temp_path $_dir/tmp/proxy;
  fastcgi_temp_path $_dir/tmp/fastcgi;
  uwsgi_temp_path $_dir/tmp/uwsgi;
  scgi_temp_path $_dir/tmp/scgi;
  server {
    listen 127.0.0.1:$_port ssl;
    ssl_certificate $_cert;
    ssl_certificate_key $_key;
    ssl_protocols TLSv1.3;
    root $_root;
    $_extra
  }
}
CONF
  nginx -t -q -c "$_dir/nginx.conf" -e "$_dir/error.log" || {
    echo "nginx -t failed: $(cat "$_dir/error.log")" >&2
    return 1
  }
}
