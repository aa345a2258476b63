# Shared by profile.sh and ab.sh (sourced): a temp dir whose processes are stopped by PID on exit,
# the nginx "ok" backend, a self-signed certificate, and a one-router meshgate config.
# Uses LOAD_CPU, PROXY_CPU and P (base port: backend on P+1) from the caller.

# Temp dir $TMP and process list PIDS, cleaned up on exit. Usage: lb_tmp NAME
lb_tmp() {
  TMP=$(mktemp -d "/tmp/$1.XXXXXX"); PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"' EXIT
}

# nginx (1 process) answering `ok` on 127.0.0.1:P+1, pinned to PROXY_CPU.
lb_backend() {
  mkdir -p "$TMP/b"
  cat >"$TMP/b/nginx.conf" <<CONF
master_process off; daemon off; worker_processes 1; pid $TMP/b/nginx.pid; error_log $TMP/b/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $TMP/b; proxy_temp_path $TMP/b; fastcgi_temp_path $TMP/b;
  uwsgi_temp_path $TMP/b; scgi_temp_path $TMP/b; keepalive_requests 1000000;
  server { listen 127.0.0.1:$((P+1)); location / { default_type text/plain; return 200 "ok\n"; } } }
CONF
  taskset -c "$PROXY_CPU" nginx -p "$TMP/b" -c "$TMP/b/nginx.conf" -e "$TMP/b/error.log" & PIDS+=($!)
}

# $TMP/cert.pem and $TMP/key.pem (ECDSA P-256, CN=localhost).
lb_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
}

# meshgate config on stdout: entrypoint on 127.0.0.1:PORT of KIND (http|https) to the backend.
# Usage: lb_config PORT KIND
lb_config() {
  cat <<CONF
log: {level: warn}
admin: {enabled: false}
providers: {file: {watch: false}}
services: {web: {endpoints: ["127.0.0.1:$((P+1))"], http_port: $((P+1))}}
entrypoints: {web: {bind: "127.0.0.1:$1", kind: $2}}
routers: {r: {entrypoints: [web], rule: "PathPrefix(\`/\`)", service: web}}
CONF
  [ "$2" = https ] && echo "http: {certificates: [{cert: $TMP/cert.pem, key: $TMP/key.pem}]}"
  return 0
}

# meshgate config on stdout: the backend (or 127.0.0.1:BACKEND_PORT) behind an L4 TCP port on
# 127.0.0.1:PORT.
# Usage: lb_l4_config PORT [BACKEND_PORT]
lb_l4_config() {
  printf 'log: {level: warn}\nadmin: {enabled: false}\nproviders: {file: {watch: false}}\n'
  printf 'services: {web: {ports: ["127.0.0.1:%s:80/tcp"], endpoints: ["127.0.0.1:%s"]}}\n' "$1" "${2:-$((P+1))}"
}

# meshgate config on stdout: a DNS server on 127.0.0.1:PORT (UDP and TCP) for the names
# s0..s999.meshgate (one endpoint each, no VIPs, no forwarding), nothing else.
# Usage: lb_dns_config PORT
lb_dns_config() {
  printf 'log: {level: warn}\nadmin: {enabled: false}\nproviders: {file: {watch: false}}\nservices:\n'
  for i in $(seq 0 999); do printf '  s%s: {endpoints: ["127.1.%s.%s"]}\n' "$i" $((i / 250)) $((i % 250 + 1)); done
  printf 'dns: {enabled: true, bind: "127.0.0.1:%s", zone: meshgate., ttl: 5, forward: false, vips: false}\n' "$1"
}
