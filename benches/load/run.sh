#!/usr/bin/env bash
# meshgate load harness: meshgate vs HAProxy / nginx / Caddy (HTTP, HTTP/2+TLS, L4 TCP),
# vs knot / nsd / dnsmasq (DNS), and idle-connection memory. See BENCHMARKS.md.
#
# - Installs nothing: it checks for the tools and says what to `apt-get install` if missing.
# - Loopback only (127.0.0.1, ports BASE_PORT..BASE_PORT+600), every process started from a
#   temp dir with its own config; every process it starts is stopped by PID (trap on exit).
# - Load generator pinned to LOAD_CPU, proxy + backends to PROXY_CPU (taskset); every proxy
#   runs one worker thread/process.
# - Interleaved rounds, each starting one target later (A B C, B C A, C A B, ...): no target
#   always follows the same one. Medians, ratios to HAProxy and to direct.
#
# Usage: benches/load/run.sh [--quick|--full] [--rounds N] [--duration S]
#                            [--only http,close,h2,tls,l4,udp,dns,mem] [--out FILE] [--keep]
#                            [--wait-quiet SECONDS]  (wait, bounded, for load average < 1.0)
#                            [--tcp-cc NAME]  (the kernel's default TCP congestion control for
#                             this run, e.g. cubic, Linux's own default; root; put back on exit)
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${MESHGATE_BIN_DIR:-$REPO/target/release}

MODE=quick
ROUNDS=
DURATION=
ONLY=http,close,h2,tls,l4,udp,dns,mem
OUT=
KEEP=0
SET_CC=                    # --tcp-cc: congestion control to run under (net.ipv4.tcp_congestion_control)
WAIT_QUIET=0               # seconds to wait (at most) for the 1-minute load average to drop below 1.0
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
BASE_PORT=${BASE_PORT:-24000}
CONNS=${CONNS:-64}          # wrk / h2load concurrent connections
MEM_CONNS=${MEM_CONNS:-}    # idle connections held in the memory scenario
BACKEND=${BACKEND:-nginx}   # nginx (static 'ok' answer) or echo (meshgate-echo)
L4_COPY=${L4_COPY:-splice}  # meshgate's l4_copy setting: splice or buffer
UPSTREAM_CC=${UPSTREAM_CC-cubic} # meshgate's upstream_congestion (empty: the kernel's default)

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --rounds) ROUNDS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --wait-quiet) WAIT_QUIET=$2; shift ;;
    --tcp-cc) SET_CC=$2; shift ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$MODE" = quick ]; then
  : "${ROUNDS:=3}" "${DURATION:=2}"
else
  : "${ROUNDS:=5}" "${DURATION:=10}"
fi

want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# The targets of round R (1-based) in the order it runs them: the list rotated by R-1, so each
# target follows every other in turn (whatever a target leaves behind, e.g. Caddy's garbage
# collector or TIME_WAIT sockets, is not always charged to the same next one).
# Usage: rotated R target...
rotated() { local r=$1; shift; local n=$#; local k=$(( (r - 1) % n )); local a=("$@"); echo "${a[@]:k}" "${a[@]:0:k}"; }

# ---------------------------------------------------------------- tools (installs nothing)
declare -A PKG=([haproxy]=haproxy [nginx]=nginx [caddy]=caddy [wrk]=wrk [h2load]=nghttp2-client
  [dnsperf]=dnsperf [knotd]=knot [nsd]=nsd [dnsmasq]=dnsmasq [iperf3]=iperf3 [openssl]=openssl
  [python3]=python3 [taskset]=util-linux)
missing=()
for t in "${!PKG[@]}"; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("${PKG[$t]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing tools; install them with:" >&2
  echo "  apt-get install -y $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')" >&2
  echo "(the harness starts each server by hand; stop any daemon the packages started)" >&2
  exit 3
fi
export PATH=$PATH:/usr/sbin
for b in meshgate meshgate-echo; do
  if [ ! -x "$BIN/$b" ]; then
    echo "no $BIN/$b: run 'cargo build --release --bins' first" >&2
    exit 3
  fi
done
# nginx's stream module (UDP scenario); Debian ships it as a separate package
NGINX_STREAM=/usr/lib/nginx/modules/ngx_stream_module.so
if want udp && [ ! -f "$NGINX_STREAM" ]; then
  echo "no $NGINX_STREAM: apt-get install -y libnginx-mod-stream (or leave 'udp' out of --only)" >&2
  exit 3
fi
if [ "$(nproc)" -lt 2 ]; then echo "needs 2 CPUs (load generator and proxy pinned apart)" >&2; exit 3; fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
if [ -z "$MEM_CONNS" ]; then
  # A proxied TCP pair costs the proxy 2 fds: stay under the hard limit for every server.
  MEM_CONNS=$(( (NOFILE - 500) / 2 ))
  [ "$MEM_CONNS" -gt 10000 ] && MEM_CONNS=10000
fi

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d /tmp/meshgate-load.XXXXXX)
PIDS=()
stop_pids() {
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null; done
  for p in "$@"; do wait "$p" 2>/dev/null; done
  return 0
}
CC_FILE=/proc/sys/net/ipv4/tcp_congestion_control
OLD_CC=
cleanup() {
  [ ${#PIDS[@]} -gt 0 ] && stop_pids "${PIDS[@]}"
  PIDS=()
  if [ -n "$OLD_CC" ]; then echo "$OLD_CC" >"$CC_FILE" && echo "tcp_congestion_control back to $OLD_CC" >&2; fi
  if [ "$KEEP" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --tcp-cc: the machine's default congestion control for this run only, put back by cleanup.
# Every target (direct included) runs under it; an algorithm the kernel lacks is an error.
if [ -n "$SET_CC" ]; then
  case " $(cat /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null) " in
    *" $SET_CC "*) ;;
    *) modprobe "tcp_$SET_CC" 2>/dev/null ;;
  esac
  prev=$(cat "$CC_FILE")
  if ! echo "$SET_CC" 2>/dev/null >"$CC_FILE"; then
    echo "--tcp-cc $SET_CC: cannot set it in $CC_FILE (not root, or an algorithm this kernel lacks; available: $(cat /proc/sys/net/ipv4/tcp_available_congestion_control))" >&2
    exit 2
  fi
  OLD_CC=$prev
fi

# start NAME CMD...: run CMD pinned to the proxy core, log to $TMP/NAME.log, remember its PID.
declare -A PID_OF
start() {
  local name=$1; shift
  taskset -c "$PROXY_CPU" "$@" >"$TMP/$name.log" 2>&1 &
  PID_OF[$name]=$!
  PIDS+=($!)
}
stop_group() {
  [ ${#PIDS[@]} -gt 0 ] && stop_pids "${PIDS[@]}"
  PIDS=()
  PID_OF=()
}
wait_tcp() { # port: until something accepts on 127.0.0.1:port (bounded 10s)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$1 (see logs in $TMP)" >&2
  return 1
}
check_alive() {
  local n
  for n in "$@"; do
    if ! kill -0 "${PID_OF[$n]}" 2>/dev/null; then
      echo "$n exited; log:" >&2; tail -20 "$TMP/$n.log" >&2; return 1
    fi
  done
  pin_all
}
# Pin every thread of every server started so far to PROXY_CPU again. `taskset` at start sets
# the mask a process starts with, but a server may set its threads' affinity itself: knot pins
# its UDP worker to CPU (worker id mod CPUs), i.e. CPU 0, beside the load generator, where its
# wake-ups of dnsperf were CPU-local (no cross-CPU wake-up) and its CPU time was not on the
# proxy core. Says which threads it moved back.
pin_all() {
  local p t want moved
  want=$PROXY_CPU
  for p in "${PIDS[@]}"; do
    for t in /proc/"$p"/task/*; do
      [ -d "$t" ] || continue
      t=${t##*/}
      if [ "$(taskset -p -c "$t" 2>/dev/null | sed 's/.*: //')" != "$want" ]; then
        taskset -p -c "$want" "$t" >/dev/null 2>&1 && moved+="$(cat /proc/"$p"/comm 2>/dev/null)/$t "
      fi
    done
  done
  [ -n "${moved:-}" ] && note "re-pinned to CPU $want: $moved"
  return 0
}
# CPU ticks (utime+stime, 1/100 s) of a PID and its children; `cpu_ticks PID user` prints
# "total user" (user = utime, the part spent in user space).
cpu_ticks() {
  python3 - "$1" "${2:-}" <<'EOF'
import sys
todo, seen, total, user = [int(sys.argv[1])], set(), 0, 0
while todo:
    p = todo.pop()
    if p in seen: continue
    seen.add(p)
    try:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
        user += int(f[11])
        todo += [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
    except OSError:
        pass
print(total, user) if sys.argv[2] == "user" else print(total)
EOF
}
# "user=N%": the share of the proxy's CPU time spent in user space (the rest is the kernel's:
# system calls, and the loopback TCP receive work they run). Usage: user_share c0 u0 c1 u1
user_share() { python3 -c "d=$3-$1; print('user=%d%%' % round(100*($4-$2)/d) if d>0 else '')"; }
# The two cores' counters from /proc/stat (LOAD_CPU's, then PROXY_CPU's): "total idle softirq"
# each, in ticks. `cores_busy` turns two snapshots into `load=N% servers=N% si=N%`: how busy each
# core was, and the share of the servers' core spent in softirq (the loopback TCP receive work
# that no process is charged for). Usage: cores_busy "$(core_ticks)" "$(core_ticks)"
core_ticks() {
  awk -v a="cpu$LOAD_CPU" -v b="cpu$PROXY_CPU" '$1 == a || $1 == b {
    t = 0; for (i = 2; i <= 9; i++) t += $i; c[$1] = t " " ($5 + $6) " " $8 }
    END { print c[a], c[b] }' /proc/stat
}
cores_busy() {
  python3 -c "
a, b = list(map(int, '$1'.split())), list(map(int, '$2'.split()))
d = [y - x for x, y in zip(a, b)]
busy = lambda t, i: round(100 * (t - i) / t) if t > 0 else 0
print('load=%d%% servers=%d%% si=%d%%' % (busy(d[0], d[1]), busy(d[3], d[4]), round(100 * d[5] / d[3]) if d[3] > 0 else 0))"
}
load() { taskset -c "$LOAD_CPU" "$@"; }

# ---------------------------------------------------------------- ports and configs
P=$BASE_PORT
B_HTTP=$((P+1)); B_TCP=$((P+3)); B_IPERF=$((P+4))
M_HTTP=$((P+101)); M_HTTPS=$((P+102)); M_L4HTTP=$((P+103)); M_L4IPERF=$((P+104)); M_L4ECHO=$((P+105))
H_HTTP=$((P+201)); H_HTTPS=$((P+202)); H_L4HTTP=$((P+203)); H_L4IPERF=$((P+204)); H_L4ECHO=$((P+205))
N_HTTP=$((P+301)); N_HTTPS=$((P+302)); N_L4HTTP=$((P+303)); N_L4IPERF=$((P+304))
C_HTTP=$((P+401)); C_HTTPS=$((P+402))
D_MESH=$((P+501)); D_KNOT=$((P+502)); D_NSD=$((P+503)); D_DNSMASQ=$((P+504))
U_KNOT=$((P+511)); U_MESH=$((P+512)); U_NGINX=$((P+513))

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null || { echo "openssl failed" >&2; exit 1; }
cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"

# nginx_head DIR [stream]: the process lines every nginx config here starts with (one worker in
# the foreground, pid and error log in DIR, the fd limit), after `load_module` for `stream`.
nginx_head() {
  [ "${2:-}" = stream ] && echo "load_module $NGINX_STREAM;"
  cat <<EOF
master_process off; daemon off; worker_processes 1; pid $1/nginx.pid;
worker_rlimit_nofile $NOFILE;
error_log $1/error.log warn;
events { worker_connections $((NOFILE - 100)); }
EOF
}

mkdir -p "$TMP/nginx-backend" "$TMP/nginx" "$TMP/caddy"
{
  nginx_head "$TMP/nginx-backend"
  cat <<EOF
http {
  access_log off;
  client_body_temp_path $TMP/nginx-backend; proxy_temp_path $TMP/nginx-backend;
  fastcgi_temp_path $TMP/nginx-backend; uwsgi_temp_path $TMP/nginx-backend; scgi_temp_path $TMP/nginx-backend;
  keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$B_HTTP reuseport backlog=4096; location / { default_type text/plain; return 200 "ok\n"; } }
}
EOF
} >"$TMP/nginx-backend/nginx.conf"

cat >"$TMP/meshgate.yaml" <<EOF
log: {level: warn}
admin: {enabled: false}
providers: {file: {watch: false}}
l4_copy: $L4_COPY
${UPSTREAM_CC:+upstream_congestion: $UPSTREAM_CC}
services:
  web:
    ports: ["127.0.0.1:$M_L4HTTP:80/tcp"]
    endpoints: ["127.0.0.1:$B_HTTP"]
  iperf:
    ports: ["127.0.0.1:$M_L4IPERF:5201/tcp"]
    endpoints: ["127.0.0.1:$B_IPERF"]
  echo:
    ports: ["127.0.0.1:$M_L4ECHO:7/tcp"]
    endpoints: ["127.0.0.1:$B_TCP"]
entrypoints:
  web: {bind: "127.0.0.1:$M_HTTP", kind: http}
  websecure: {bind: "127.0.0.1:$M_HTTPS", kind: https}
routers:
  r: {entrypoints: [web, websecure], rule: "PathPrefix(\`/\`)", service: web}
http:
  certificates: [{cert: $TMP/cert.pem, key: $TMP/key.pem}]
EOF

cat >"$TMP/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $((NOFILE / 2 - 100))
  tune.ssl.default-dh-param 2048
defaults
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend web
  mode http
  bind 127.0.0.1:$H_HTTP
  bind 127.0.0.1:$H_HTTPS ssl crt $TMP/haproxy.pem alpn h2,http/1.1
  default_backend web
backend web
  mode http
  http-reuse always
  server s1 127.0.0.1:$B_HTTP
listen l4http
  mode tcp
  bind 127.0.0.1:$H_L4HTTP
  server s1 127.0.0.1:$B_HTTP
listen l4iperf
  mode tcp
  bind 127.0.0.1:$H_L4IPERF
  server s1 127.0.0.1:$B_IPERF
listen l4echo
  mode tcp
  bind 127.0.0.1:$H_L4ECHO
  server s1 127.0.0.1:$B_TCP
EOF

{
  nginx_head "$TMP/nginx"
  cat <<EOF
http {
  access_log off;
  client_body_temp_path $TMP/nginx; proxy_temp_path $TMP/nginx;
  fastcgi_temp_path $TMP/nginx; uwsgi_temp_path $TMP/nginx; scgi_temp_path $TMP/nginx;
  keepalive_requests 1000000; keepalive_timeout 300s;
  upstream web { server 127.0.0.1:$B_HTTP; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$N_HTTP backlog=4096;
    listen 127.0.0.1:$N_HTTPS ssl http2;
    ssl_certificate $TMP/cert.pem; ssl_certificate_key $TMP/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
} >"$TMP/nginx/nginx.conf"

cat >"$TMP/caddy/Caddyfile" <<EOF
{
  admin off
  auto_https off
  log {
    level ERROR
  }
}
http://127.0.0.1:$C_HTTP {
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:$B_HTTP
}
https://127.0.0.1:$C_HTTPS {
  bind 127.0.0.1
  tls $TMP/cert.pem $TMP/key.pem
  reverse_proxy 127.0.0.1:$B_HTTP
}
EOF

start_backends() {
  if [ "$BACKEND" = echo ]; then
    start backend env TOKIO_WORKER_THREADS=1 "$BIN/meshgate-echo" --name b --http "127.0.0.1:$B_HTTP" --tcp "127.0.0.1:$B_TCP"
  else
    start backend nginx -p "$TMP/nginx-backend" -c "$TMP/nginx-backend/nginx.conf" -e "$TMP/nginx-backend/error.log"
    start tcpecho env TOKIO_WORKER_THREADS=1 "$BIN/meshgate-echo" --name b --tcp "127.0.0.1:$B_TCP"
    wait_tcp "$B_TCP" || exit 1
  fi
  wait_tcp "$B_HTTP" || exit 1
}
start_proxies() { # names...
  local n
  for n in "$@"; do
    case $n in
      meshgate) start meshgate env TOKIO_WORKER_THREADS=1 "$BIN/meshgate" run --config "$TMP/meshgate.yaml"
                wait_tcp "$M_HTTP" || exit 1 ;;
      haproxy) start haproxy haproxy -db -f "$TMP/haproxy.cfg"; wait_tcp "$H_HTTP" || exit 1 ;;
      nginx) start nginx nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log"
             wait_tcp "$N_HTTP" || exit 1 ;;
      caddy) start caddy env GOMAXPROCS=1 HOME="$TMP/caddy" XDG_DATA_HOME="$TMP/caddy" \
               XDG_CONFIG_HOME="$TMP/caddy" caddy run --config "$TMP/caddy/Caddyfile" --adapter caddyfile
             wait_tcp "$C_HTTP" || exit 1 ;;
    esac
  done
  sleep 0.5
  check_alive "$@" || exit 1
}

# ---------------------------------------------------------------- results
RES=$TMP/results.tsv   # scenario target round value extra...
: >"$RES"
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RES"; }
note() { echo "[$(date +%T)] $*" >&2; }

# wrk run -> "req/s p99_ms"
wrk_run() { # url [extra args]
  local url=$1; shift
  load wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url" 2>&1 | python3 -c '
import sys, re
t = sys.stdin.read()
rps = re.search(r"Requests/sec:\s*([\d.]+)", t)
p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sockerr = re.search(r"Socket errors: (.*)", t)
if not rps:
    print("0 0 wrk-failed"); sys.exit()
mult = {"us": 0.001, "ms": 1, "s": 1000}
p = float(p99.group(1)) * mult[p99.group(2)] if p99 else 0
extra = ("non2xx=" + errs.group(1)) if errs else ""
if sockerr: extra += " sockerr:" + sockerr.group(1).replace(" ", "")
print(rps.group(1), round(p, 3), extra or "-")
'
}

# One measured L7/L4 request run with proxy CPU per request.
measure_wrk() { # scenario target pidname url [wrk args]
  local sc=$1 tg=$2 pn=$3 url=$4 r=$5; shift 5
  local c0 c1 u0 u1 out rps p99 extra cpu user
  read -r c0 u0 <<<"$( [ -n "$pn" ] && cpu_ticks "${PID_OF[$pn]}" user || echo 0 0)"
  out=$(wrk_run "$url" "$@")
  read -r c1 u1 <<<"$( [ -n "$pn" ] && cpu_ticks "${PID_OF[$pn]}" user || echo 0 0)"
  read -r rps p99 extra <<<"$out"
  # proxy CPU µs per request (ticks are 10 ms)
  cpu=$(python3 -c "r=$rps*$DURATION; print(round(($c1-$c0)*10000/r,2) if r>0 else 0)")
  user=$(user_share "$c0" "$u0" "$c1" "$u1")
  [ "$extra" = - ] && extra=
  extra=$(echo $user $extra); extra=${extra:--}
  record "$sc" "$tg" "$r" "$rps" "$p99" "$cpu $extra"
  note "$sc $tg round $r: $rps req/s p99 ${p99}ms cpu/req ${cpu}us $extra"
}

h2_run() { # url -> req/s
  load h2load -t1 -c"$CONNS" -m10 -D "$DURATION" --warm-up-time=1 "$1" 2>&1 | python3 -c '
import sys, re
t = sys.stdin.read()
m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t)
ok = re.search(r"(\d+) succeeded, (\d+) failed", t)
proto = re.search(r"TLS Protocol: (\S+)", t)
alpn = re.search(r"Application protocol: (\S+)", t)
print(m.group(1) if m else 0, (proto.group(1) if proto else "?") + "/" + (alpn.group(1) if alpn else "?"),
      "failed=" + (ok.group(2) if ok else "?"))
'
}

iperf_run() { # port streams -> Gbit/s
  load iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$DURATION" -J 2>/dev/null | python3 -c '
import sys, json
try:
    j = json.load(sys.stdin); print(round(j["end"]["sum_received"]["bits_per_second"] / 1e9, 3))
except Exception:
    print(0)
'
}

# ---------------------------------------------------------------- scenarios
pidname() { [ "$1" = direct ] || echo "$1"; } # target -> the process measure_wrk measures
http_port() { case $1 in direct) echo "$B_HTTP" ;; meshgate) echo "$M_HTTP" ;; haproxy) echo "$H_HTTP" ;;
  nginx) echo "$N_HTTP" ;; caddy) echo "$C_HTTP" ;; esac; }

sc_http() { # keep-alive and close
  start_backends
  start_proxies meshgate haproxy nginx caddy
  local r
  # warm-up (connection pools, page cache)
  for u in $B_HTTP $M_HTTP $H_HTTP $N_HTTP $C_HTTP; do load wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$u/" >/dev/null 2>&1; done
  for r in $(seq "$ROUNDS"); do
    if want http; then
      for t in $(rotated "$r" direct meshgate haproxy nginx caddy); do
        measure_wrk http-ka "$t" "$(pidname "$t")" "http://127.0.0.1:$(http_port "$t")/" "$r"
      done
    fi
    if want close; then
      for t in $(rotated "$r" direct meshgate haproxy nginx caddy); do
        measure_wrk http-close "$t" "$(pidname "$t")" "http://127.0.0.1:$(http_port "$t")/" "$r" -H "Connection: close"
      done
    fi
  done
  stop_group
}

sc_tls() { # HTTP/2 over TLS keep-alive; CPU per full TLS 1.3 handshake
  start_backends
  start_proxies meshgate haproxy nginx caddy
  local r t port out rps info extra c0 c1 u0 u1 n cpu share
  for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" meshgate haproxy nginx caddy); do
      case $t in meshgate) port=$M_HTTPS ;; haproxy) port=$H_HTTPS ;; nginx) port=$N_HTTPS ;; caddy) port=$C_HTTPS ;; esac
      if want h2; then
        # CPU from the end of h2load's 1-s warm-up (connections, handshakes, first requests:
        # not counted in its req/s) to its end: the window its req/s counts. (Before session
        # 13 the warm-up's CPU was counted too, ~(D+1)/D too much per request for every target.)
        h2_run "https://127.0.0.1:$port/" >"$TMP/h2.out" & local h2=$!
        sleep 1
        read -r c0 u0 <<<"$(cpu_ticks "${PID_OF[$t]}" user)"
        wait "$h2"
        read -r c1 u1 <<<"$(cpu_ticks "${PID_OF[$t]}" user)"
        out=$(cat "$TMP/h2.out")
        read -r rps info extra <<<"$out"
        cpu=$(python3 -c "r=$rps*$DURATION; print(round(($c1-$c0)*10000/r,2) if r>0 else 0)")
        share=$(user_share "$c0" "$u0" "$c1" "$u1")
        extra="${share:+$share }$extra"
        record h2-tls "$t" "$r" "$rps" 0 "$cpu $info $extra"
        note "h2-tls $t round $r: $rps req/s cpu/req ${cpu}us $info $extra"
      fi
      if want tls; then
        # Full handshakes (no resumption), sequential, one client core: openssl s_time -new.
        c0=$(cpu_ticks "${PID_OF[$t]}")
        out=$(load openssl s_time -connect "127.0.0.1:$port" -new -time "$DURATION" 2>&1 |
          sed -n 's/^\([0-9]*\) connections in \([0-9.]*\) real seconds.*/\1 \2/p' | head -1)
        c1=$(cpu_ticks "${PID_OF[$t]}")
        n=${out%% *}; n=${n:-0}
        cpu=$(python3 -c "print(round(($c1-$c0)*10000/$n,1) if $n>0 else 0)")
        local rate; rate=$(python3 -c "print(round($n/${out##* },1) if $n>0 else 0)" 2>/dev/null || echo 0)
        record tls-handshake "$t" "$r" "$rate" 0 "$cpu"
        note "tls-handshake $t round $r: $rate hs/s (client-bound) proxy cpu/handshake ${cpu}us"
      fi
    done
  done
  stop_group
}

sc_l4() {
  start_backends
  start iperf3 iperf3 -s -B 127.0.0.1 -p "$B_IPERF"
  wait_tcp "$B_IPERF" || exit 1
  start_proxies meshgate haproxy
  # nginx `stream` (TCP, its default 16 KiB buffer per direction) where the module is installed.
  local targets="direct meshgate haproxy"
  if [ -f "$NGINX_STREAM" ]; then
    mkdir -p "$TMP/nginx-l4"
    {
      nginx_head "$TMP/nginx-l4" stream
      cat <<EOF
stream {
  server { listen 127.0.0.1:$N_L4HTTP; proxy_pass 127.0.0.1:$B_HTTP; }
  server { listen 127.0.0.1:$N_L4IPERF; proxy_pass 127.0.0.1:$B_IPERF; }
}
EOF
    } >"$TMP/nginx-l4/nginx.conf"
    start nginx nginx -p "$TMP/nginx-l4" -c "$TMP/nginx-l4/nginx.conf" -e "$TMP/nginx-l4/error.log"
    wait_tcp "$N_L4HTTP" || exit 1
    check_alive nginx || exit 1
    targets="$targets nginx"
  else
    note "l4: no $NGINX_STREAM (apt-get install -y libnginx-mod-stream): nginx stream left out"
  fi
  local r s t port g c0 c1 cpu k0 k1 cores
  for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" $targets); do
      case $t in direct) port=$B_HTTP ;; meshgate) port=$M_L4HTTP ;; haproxy) port=$H_L4HTTP ;;
        nginx) port=$N_L4HTTP ;; esac
      measure_wrk l4-rr "$t" "$(pidname "$t")" "http://127.0.0.1:$port/" "$r"
    done
    for s in 1 4; do
      for t in $(rotated "$r" $targets); do
        case $t in direct) port=$B_IPERF ;; meshgate) port=$M_L4IPERF ;; haproxy) port=$H_L4IPERF ;;
          nginx) port=$N_L4IPERF ;; esac
        c0=$( [ $t != direct ] && cpu_ticks "${PID_OF[$t]}" || echo 0)
        k0=$(core_ticks)
        g=$(iperf_run "$port" "$s")
        k1=$(core_ticks)
        c1=$( [ $t != direct ] && cpu_ticks "${PID_OF[$t]}" || echo 0)
        cpu=$(python3 -c "print(round(($c1-$c0)/($DURATION),1))")   # % of one core
        cores=$(cores_busy "$k0" "$k1")
        record "l4-bulk-$s" "$t" "$r" "$g" 0 "$cpu $cores"
        note "l4-bulk-$s $t round $r: $g Gbit/s proxy cpu ${cpu}% cores: $cores"
        sleep 0.3
      done
    done
  done
  stop_group
}

# The DNS zone both DNS scenarios serve (n names), as a zone file and as dnsperf's queries.
dns_zone() { # n
  local n=$1 i
  {
    echo "\$ORIGIN meshgate."
    echo "\$TTL 5"
    echo "@ SOA ns.meshgate. hostmaster.meshgate. 1 3600 600 86400 5"
    echo "@ NS ns.meshgate."
    echo "ns A 127.0.0.1"
    for i in $(seq 0 $((n - 1))); do echo "s$i A 127.1.$((i / 250)).$((i % 250 + 1))"; done
  } >"$TMP/meshgate.zone"
  for i in $(seq 0 $((n - 1))); do echo "s$i.meshgate A"; done >"$TMP/queries.txt"
}
knot_conf() { # port dir: a one-worker knot serving $TMP/meshgate.zone
  mkdir -p "$2"
  cat >"$2/knot.conf" <<EOF
server:
  listen: 127.0.0.1@$1
  rundir: $2
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
database:
  storage: $2
log:
  - target: stderr
    any: warning
zone:
  - domain: meshgate.
    file: $TMP/meshgate.zone
    zonefile-sync: -1
    journal-content: none
EOF
}

# dnsperf's average latency (its output on stdin) in microseconds. A server that answers later
# works on bigger batches: at one offered rate, CPU per query and latency trade against each other.
dns_latency_us() {
  sed -n 's/^ *Average Latency (s): *\([0-9.]*\).*/\1/p' | python3 -c 'import sys; t=sys.stdin.read().strip(); print(round(float(t)*1e6) if t else "?")'
}

sc_dns() {
  local n=1000 i
  mkdir -p "$TMP/knot" "$TMP/nsd"
  {
    echo "services:"
    for i in $(seq 0 $((n - 1))); do
      echo "  s$i: {endpoints: [\"127.1.$((i / 250)).$((i % 250 + 1))\"]}"
    done
    echo "dns: {enabled: true, bind: \"127.0.0.1:$D_MESH\", zone: meshgate., ttl: 5, forward: false, vips: false}"
    echo "admin: {enabled: false}"
    echo "log: {level: warn}"
    echo "providers: {file: {watch: false}}"
  } >"$TMP/meshgate-dns.yaml"
  dns_zone "$n"
  for i in $(seq 0 $((n - 1))); do echo "127.1.$((i / 250)).$((i % 250 + 1)) s$i.meshgate"; done >"$TMP/dnsmasq.hosts"
  knot_conf "$D_KNOT" "$TMP/knot"
  cat >"$TMP/nsd/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$D_NSD
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$TMP"
  database: ""
  zonelistfile: "$TMP/nsd/zone.list"
  xfrdfile: "$TMP/nsd/xfrd.state"
  xfrdir: "$TMP/nsd"
  pidfile: "$TMP/nsd/nsd.pid"
  logfile: "$TMP/nsd/nsd.log"
  do-ip6: no
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: meshgate.
  zonefile: "$TMP/meshgate.zone"
EOF
  start dns-meshgate env TOKIO_WORKER_THREADS=1 "$BIN/meshgate" run --config "$TMP/meshgate-dns.yaml"
  start dns-knot knotd -c "$TMP/knot/knot.conf"
  start dns-nsd nsd -d -c "$TMP/nsd/nsd.conf"
  start dns-dnsmasq dnsmasq -k --conf-file=/dev/null --port="$D_DNSMASQ" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts --addn-hosts="$TMP/dnsmasq.hosts" --local=/meshgate/ \
    --user=root --pid-file="$TMP/dnsmasq.pid" --cache-size=10000
  sleep 2
  check_alive dns-meshgate dns-knot dns-nsd dns-dnsmasq || exit 1
  local r t port c0 c1 out qps lost codes cpu lat ceil=()
  for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" meshgate knot nsd dnsmasq); do
      case $t in meshgate) port=$D_MESH ;; knot) port=$D_KNOT ;; nsd) port=$D_NSD ;; dnsmasq) port=$D_DNSMASQ ;; esac
      c0=$(cpu_ticks "${PID_OF[dns-$t]}")
      out=$(load dnsperf -s 127.0.0.1 -p "$port" -d "$TMP/queries.txt" -l "$DURATION" -c 4 -T 1 -q 200 2>&1)
      c1=$(cpu_ticks "${PID_OF[dns-$t]}")
      qps=$(sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p' <<<"$out")
      lost=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' <<<"$out")
      codes=$(sed -n 's/^ *Response codes: *//p' <<<"$out" | sed 's/ [0-9]* (/(/g' | tr -d ' ')
      lat=$(dns_latency_us <<<"$out")
      qps=${qps:-0}
      cpu=$(python3 -c "q=$qps*$DURATION; print(round(($c1-$c0)*10000/q,2) if q>0 else 0)")
      record dns "$t" "$r" "$qps" 0 "$cpu $codes avg-latency=${lat}us"
      note "dns $t round $r: $qps qps cpu/query ${cpu}us lost=${lost:-?} $codes avg latency ${lat}us"
      ceil+=("$qps")
    done
  done
  # CPU per query falls as batches grow, and batches grow with load: a server answering fewer
  # queries at the ceiling works on bigger batches. So CPU per query is compared again at one
  # offered rate for all (dnsperf -Q), 70 % of the lowest ceiling measured above.
  local rate
  rate=$(python3 -c "import sys; print(int(min(float(x) for x in sys.argv[1:]) * 0.7 // 1000 * 1000))" "${ceil[@]}")
  for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" meshgate knot nsd dnsmasq); do
      case $t in meshgate) port=$D_MESH ;; knot) port=$D_KNOT ;; nsd) port=$D_NSD ;; dnsmasq) port=$D_DNSMASQ ;; esac
      c0=$(cpu_ticks "${PID_OF[dns-$t]}")
      out=$(load dnsperf -s 127.0.0.1 -p "$port" -d "$TMP/queries.txt" -l "$DURATION" -c 4 -T 1 -q 200 -Q "$rate" 2>&1)
      c1=$(cpu_ticks "${PID_OF[dns-$t]}")
      qps=$(sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p' <<<"$out")
      qps=${qps:-0}
      lat=$(dns_latency_us <<<"$out")
      cpu=$(python3 -c "q=$qps*$DURATION; print(round(($c1-$c0)*10000/q,2) if q>0 else 0)")
      record dns-rate "$t" "$r" "$qps" 0 "$cpu offered=$rate avg-latency=${lat}us"
      note "dns-rate $t round $r: $qps qps (offered $rate) cpu/query ${cpu}us avg latency ${lat}us"
    done
  done
  stop_group
}

sc_udp() {
  # L4 UDP: dnsperf through each proxy to one knot (the backend), against knot direct. dnsperf's
  # 4 sockets are 4 client flows; each proxy keeps a flow's upstream socket between datagrams
  # (nginx: a UDP session per client address, 30 s, as meshgate's flow idle timeout).
  dns_zone 1000
  knot_conf "$U_KNOT" "$TMP/uknot"
  mkdir -p "$TMP/nginx-udp"
  {
    nginx_head "$TMP/nginx-udp" stream
    cat <<EOF
stream {
  upstream dns { server 127.0.0.1:$U_KNOT; }
  server { listen 127.0.0.1:$U_NGINX udp; proxy_pass dns; proxy_timeout 30s; }
}
EOF
  } >"$TMP/nginx-udp/nginx.conf"
  cat >"$TMP/meshgate-udp.yaml" <<EOF
log: {level: warn}
admin: {enabled: false}
providers: {file: {watch: false}}
services:
  dns:
    ports: ["127.0.0.1:$U_MESH:53/udp"]
    endpoints: ["127.0.0.1:$U_KNOT"]
EOF
  start udp-knot knotd -c "$TMP/uknot/knot.conf"
  start meshgate env TOKIO_WORKER_THREADS=1 "$BIN/meshgate" run --config "$TMP/meshgate-udp.yaml"
  start nginx nginx -p "$TMP/nginx-udp" -c "$TMP/nginx-udp/nginx.conf" -e "$TMP/nginx-udp/error.log"
  sleep 2
  check_alive udp-knot meshgate nginx || exit 1
  local r t port c0 c1 out qps lost cpu
  for r in $(seq "$ROUNDS"); do
    for t in $(rotated "$r" direct meshgate nginx); do
      case $t in direct) port=$U_KNOT ;; meshgate) port=$U_MESH ;; nginx) port=$U_NGINX ;; esac
      c0=$( [ $t != direct ] && cpu_ticks "${PID_OF[$t]}" || echo 0)
      out=$(load dnsperf -s 127.0.0.1 -p "$port" -d "$TMP/queries.txt" -l "$DURATION" -c 4 -T 1 -q 200 2>&1)
      c1=$( [ $t != direct ] && cpu_ticks "${PID_OF[$t]}" || echo 0)
      qps=$(sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p' <<<"$out")
      lost=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' <<<"$out")
      qps=${qps:-0}
      cpu=$(python3 -c "q=$qps*$DURATION; print(round(($c1-$c0)*10000/q,2) if q>0 else 0)")
      record udp "$t" "$r" "$qps" 0 "$cpu lost=${lost:-?}"
      note "udp $t round $r: $qps qps proxy cpu/query ${cpu}us lost=${lost:-?}"
    done
  done
  stop_group
}

sc_mem() {
  # Fresh processes: RSS before / with N idle connections / after they closed.
  local t port mode out
  for spec in meshgate:http haproxy:http nginx:http caddy:http meshgate:tcp haproxy:tcp; do
    t=${spec%%:*}; mode=${spec##*:}
    start_backends
    start_proxies "$t"
    case $spec in
      meshgate:http) port=$M_HTTP ;; haproxy:http) port=$H_HTTP ;; nginx:http) port=$N_HTTP ;;
      caddy:http) port=$C_HTTP ;; meshgate:tcp) port=$M_L4ECHO ;; haproxy:tcp) port=$H_L4ECHO ;;
    esac
    # warm the proxy with a short load first, as a production process would be
    if [ "$mode" = http ]; then load wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null 2>&1; fi
    out=$(load python3 "$HERE/hold_conns.py" --port "$port" --n "$MEM_CONNS" --mode "$mode" \
      --pid "${PID_OF[$t]}" --settle 2 --timeout 90) || note "mem $spec: $out (client reported a failure)"
    read -r before held after opened per <<<"$out"
    record "mem-$mode" "$t" 1 "${per:-0}" 0 "before=${before}KiB held=${held}KiB after=${after}KiB n=${opened}"
    note "mem-$mode $t: ${per} B/conn (before ${before} KiB, held ${held} KiB, after close ${after} KiB, n=${opened})"
    stop_group
  done
}

# ---------------------------------------------------------------- main
# The kernel's default TCP congestion control shapes every loopback TCP result, L4 bulk most
# (with bbr, and no fq qdisc on lo, each sender paces itself with timers): it goes in the table.
TCP_CC=$(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null || echo unknown)
note "mode=$MODE rounds=$ROUNDS duration=${DURATION}s conns=$CONNS backend=$BACKEND l4_copy=$L4_COPY upstream_cc=${UPSTREAM_CC:-kernel} mem_conns=$MEM_CONNS nofile=$NOFILE tcp_cc=$TCP_CC"
if [ "$WAIT_QUIET" -gt 0 ]; then
  end=$((SECONDS + WAIT_QUIET))
  while [ $SECONDS -lt $end ] && ! awk '{exit !($1 < 1.0)}' /proc/loadavg; do sleep 5; done
fi
note "load average: $(cut -d' ' -f1-3 /proc/loadavg); load generator on CPU $LOAD_CPU, servers on CPU $PROXY_CPU"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
if want http || want close; then sc_http; fi
if want h2 || want tls; then sc_tls; fi
if want l4; then sc_l4; fi
if want dns; then sc_dns; fi
if want udp; then sc_udp; fi
if want mem; then sc_mem; fi

# ---------------------------------------------------------------- table
{
echo "mode=$MODE rounds=$ROUNDS duration=${DURATION}s wrk/h2load conns=$CONNS backend=$BACKEND l4_copy=$L4_COPY upstream_cc=${UPSTREAM_CC:-kernel} idle conns=$MEM_CONNS tcp_cc=$TCP_CC;" \
  "load average at start: $LOAD0, at end: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
echo
python3 - "$RES" <<'EOF'

import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = collections.OrderedDict()
for sc, tg, rnd, val, p99, extra in rows:
    data.setdefault(sc, collections.OrderedDict()).setdefault(tg, []).append((float(val), float(p99), extra))
units = {"http-ka": "req/s", "http-close": "req/s", "h2-tls": "req/s", "tls-handshake": "hs/s",
         "l4-rr": "req/s", "l4-bulk-1": "Gbit/s", "l4-bulk-4": "Gbit/s", "dns": "qps", "dns-rate": "qps", "udp": "qps",
         "mem-http": "B/conn", "mem-tcp": "B/conn"}
extra_name = {"tls-handshake": "proxy CPU µs/handshake", "l4-bulk-1": "proxy CPU %",
              "l4-bulk-4": "proxy CPU %", "dns": "server CPU µs/query",
              "dns-rate": "server CPU µs/query", "udp": "proxy CPU µs/query", "mem-http": "RSS",
              "mem-tcp": "RSS"}
print("| scenario | target | median | unit | p99 ms | %s | vs haproxy | vs direct | rounds |" % "extra")
print("|---|---|---:|---|---:|---|---:|---:|---|")
for sc, tgs in data.items():
    med = {t: statistics.median(v[0] for v in vs) for t, vs in tgs.items()}
    for t, vs in tgs.items():
        m = med[t]
        p99 = statistics.median(v[1] for v in vs)
        ex = [v[2].split(" ")[0] for v in vs]
        try:
            exm = statistics.median(float(e) for e in ex)
            exs = ("%s %.2f" % (extra_name.get(sc, "proxy CPU µs/req"), exm))
        except ValueError:
            exs = vs[0][2]
        # After the first field: `key=NUMBERunit` tokens get the median over the rounds; other
        # tokens are listed once each.
        nums, words = collections.OrderedDict(), []
        for v in vs:
            for tok in v[2].split(" ")[1:]:
                k, _, val = tok.partition("=")
                num = val.rstrip("usmKiB%")
                try:
                    x = float(num) if val else float("nan")
                    if x != x:
                        raise ValueError
                    nums.setdefault(k, (val[len(num):], []))[1].append(x)
                except ValueError:
                    if tok not in words:
                        words.append(tok)
        tail = " ".join(sorted(words) + ["%s=%g%s" % (k, statistics.median(xs), unit)
                                         for k, (unit, xs) in nums.items()])
        if tail.strip("- "):
            exs += " " + tail
        if sc.startswith("mem"):
            exs = vs[0][2]
        rh = ("%.2f" % (m / med["haproxy"])) if med.get("haproxy") else (
            ("%.2f (nginx)" % (m / med["nginx"])) if med.get("nginx") else "")
        rd = ("%.2f" % (m / med["direct"])) if med.get("direct") else ""
        print("| %s | %s | %.6g | %s | %s | %s | %s | %s | %s |" % (sc, t, m, units.get(sc, ""),
              ("%.2f" % p99) if p99 else "", exs, rh, rd, ",".join("%.6g" % v[0] for v in vs)))

# Paired by round: meshgate against each other server measured in the same round (A B C, A B C
# ...), so that a machine whose speed drifts between rounds moves both sides of each ratio. A
# median of per-round ratios, its range, and in how many rounds meshgate was ahead say more
# about "one run" than the ratio of two medians above when rounds swing.
lower_better = {"mem-http", "mem-tcp"}
by_round = collections.OrderedDict()
for sc, tg, rnd, val, p99, extra in rows:
    by_round.setdefault(sc, collections.OrderedDict()).setdefault(tg, {})[rnd] = (float(val), float(p99))
paired = []
for sc, tgs in by_round.items():
    mg = tgs.get("meshgate")
    if not mg:
        continue
    for t, rs in tgs.items():
        if t in ("meshgate", "direct"):
            continue
        common = [r for r in mg if r in rs and rs[r][0] > 0 and mg[r][0] > 0]
        if not common:
            continue
        ratios = [mg[r][0] / rs[r][0] for r in common]
        ahead = sum(1 for x in ratios if (x <= 1 if sc in lower_better else x >= 1))
        p99s = [mg[r][1] / rs[r][1] for r in common if mg[r][1] > 0 and rs[r][1] > 0]
        p99txt = ("%.2f (%.2f–%.2f), lower or equal in %d/%d" % (statistics.median(p99s), min(p99s),
                  max(p99s), sum(1 for x in p99s if x <= 1), len(p99s))) if p99s else ""
        paired.append("| %s | %s | %.2f | %.2f–%.2f | %d/%d | %s |" % (sc, t, statistics.median(ratios),
                      min(ratios), max(ratios), ahead, len(ratios), p99txt))
if paired:
    print()
    print("Paired by round (meshgate ÷ other, same round; for memory lower is better):")
    print()
    print("| scenario | vs | median ratio | range | meshgate ahead | p99 ratio (range), meshgate's lower or equal |")
    print("|---|---|---:|---|---:|---|")
    print("\n".join(paired))
EOF
} | tee ${OUT:+"$OUT"}
