# shellcheck shell=sh
# Sourced by the benchmark scripts: stopping background servers, and Debian's
# nginx as a plain static file server over TLS 1.3, for comparisons run on
# the same machine.

# stop_pid PID: TERM, wait up to 10 s, then KILL.
stop_pid() {
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null || return 0
  i=0
  while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
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
