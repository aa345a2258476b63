#!/usr/bin/env bash
# Profile meshgate on the L7 keep-alive scenario: nginx backend + meshgate (1 worker) pinned to
# PROXY_CPU, wrk pinned to LOAD_CPU, `perf record` (cpu-clock, works in VMs without PMU) on the
# meshgate PID for the duration of the load. Prints the top self-time symbols.
# Needs: linux-perf, nginx, wrk; target/release/meshgate (release profile keeps debug=1).
# Usage: benches/load/profile.sh [seconds]   (default 10); STRACE=1 for syscall counts instead
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
SECS=${1:-10}; LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-25000}
for t in perf nginx wrk; do command -v $t >/dev/null || { echo "missing $t (apt-get install linux-perf nginx wrk)" >&2; exit 3; }; done
TMP=$(mktemp -d /tmp/meshgate-prof.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"' EXIT
mkdir -p "$TMP/b"
cat >"$TMP/b/nginx.conf" <<CONF
master_process off; daemon off; worker_processes 1; pid $TMP/b/nginx.pid; error_log $TMP/b/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $TMP/b; proxy_temp_path $TMP/b; fastcgi_temp_path $TMP/b;
  uwsgi_temp_path $TMP/b; scgi_temp_path $TMP/b; keepalive_requests 1000000;
  server { listen 127.0.0.1:$((P+1)); location / { default_type text/plain; return 200 "ok\n"; } } }
CONF
cat >"$TMP/m.yaml" <<CONF
log: {level: warn}
admin: {enabled: false}
providers: {file: {watch: false}}
services: {web: {endpoints: ["127.0.0.1:$((P+1))"], http_port: $((P+1))}}
entrypoints: {web: {bind: "127.0.0.1:$((P+2))", kind: http}}
routers: {r: {entrypoints: [web], rule: "PathPrefix(\`/\`)", service: web}}
CONF
taskset -c "$PROXY_CPU" nginx -p "$TMP/b" -c "$TMP/b/nginx.conf" -e "$TMP/b/error.log" & PIDS+=($!)
TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" "$REPO/target/release/meshgate" run --config "$TMP/m.yaml" & MG=$!; PIDS+=($MG)
sleep 1
taskset -c "$LOAD_CPU" wrk -t1 -c64 -d1s "http://127.0.0.1:$((P+2))/" >/dev/null
if [ "${STRACE:-0}" = 1 ]; then
  # Syscalls per request instead of a profile (strace slows meshgate; only the counts matter).
  timeout "$SECS" strace -c -f -p "$MG" -o "$TMP/strace.txt" & ST=$!
  taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:$((P+2))/" | tee "$TMP/wrk.txt"
  wait "$ST"; cat "$TMP/strace.txt"; exit 0
fi
perf record -e cpu-clock -F 1999 -g -p "$MG" -o "$TMP/perf.data" -- sleep "$SECS" 2>/dev/null & PERF=$!
taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${SECS}s" "http://127.0.0.1:$((P+2))/"
wait "$PERF"
echo "== top symbols by self time (meshgate, L7 keep-alive) =="
rep() { perf report -i "$TMP/perf.data" --no-children -g none --stdio "$@" 2>/dev/null | grep -E '^ +[0-9]' | sed 's/  *$//' ; }
rep --sort symbol | head -"${TOP:-40}"
echo "== by shared object =="; rep --sort dso | head -8
echo "== by thread =="; rep --sort comm | head -8
echo "== meshgate binary only (userspace Rust: meshgate, hyper, tokio, http, rustls) =="
rep --sort symbol --dsos meshgate | head -25
echo "== syscalls entered (kernel entry points by caller) =="
perf report -i "$TMP/perf.data" --children -g none --stdio --sort symbol 2>/dev/null | grep -E '^ +[0-9].*(__x64_sys|do_syscall)' | sed 's/  *$//' | head -15
