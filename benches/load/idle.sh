#!/usr/bin/env bash
# What meshgate costs when no traffic flows, and what that does to traffic: for each binary,
#  - CPU (utime+stime from /proc/PID/stat) and thread wake-ups (summed voluntary context switches
#    of /proc/PID/task/*/status) over 20 s, after 10 s of settling, on three configs:
#      big      5,000 services x 10 endpoints, each with a TCP health check (interval 1h; nothing
#               listens on the endpoints, so a check fails at once)
#      nocheck  the same services without checks
#      default  config/meshgate.yaml
#  - keep-alive req/s through the `big` process (plus a demo backend, an entrypoint and a router),
#    meshgate on PROXY_CPU, `wrk -t1 -c32 -d5s` on LOAD_CPU, binaries interleaved per round.
# Usage: benches/load/idle.sh [ROUNDS] BIN [BIN...]   (ROUNDS: keep-alive rounds, default 3)
# Needs: wrk, curl. Loopback only (ports P+1, P+2 and P+3 with P=BASE_PORT, default 27000);
# every process it starts is stopped by PID.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-27000}
ROUNDS=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then ROUNDS=$1; shift; fi
[ $# -ge 1 ] || { echo "usage: $0 [ROUNDS] BIN [BIN...]" >&2; exit 2; }
for t in wrk curl; do command -v $t >/dev/null || { echo "missing $t (apt-get install $t)" >&2; exit 3; }; done
. "$HERE/common.sh"
lb_tmp meshgate-idle

gen() { # name services checks(yes|no) http(yes|no)
  {
    echo "log: {level: warn}"
    echo "admin: {enabled: false}"
    echo "providers: {file: {watch: false}}"
    if [ "$4" = yes ]; then
      echo "demo: {http: [{name: demo, bind: \"127.0.0.1:$((P+1))\"}]}"
      echo "entrypoints: {web: {bind: \"127.0.0.1:$((P+2))\", kind: http}}"
      echo "routers: {all: {entrypoints: [web], rule: \"PathPrefix(\`/\`)\", service: demo}}"
    fi
    echo "services:"
    [ "$4" = yes ] && echo "  demo: {http_port: 80, endpoints: [\"127.0.0.1:$((P+1))\"]}"
    local eps check=""
    eps=$(for j in $(seq 0 9); do printf '"127.0.0.1:%d",' $((P+100+j)); done)
    [ "$3" = yes ] && check=", health_check: {interval: 1h, timeout: 1s, fall: 3, rise: 2}"
    for i in $(seq 0 $(($2 - 1))); do
      echo "  s$i: {http_port: 80, endpoints: [${eps%,}]$check}"
    done
  } >"$TMP/$1.yaml"
}
gen big 5000 yes no
gen nocheck 5000 no no
gen bighttp 5000 yes yes
cp "$REPO/config/meshgate.yaml" "$TMP/default.yaml"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wakeups() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/{s+=$2} END{print s+0}'; }

echo "| binary | config | CPU s per 20 s | wake-ups/s | RSS KiB |"
echo "|---|---|---:|---:|---:|"
for bin in "$@"; do
  for cfg in big nocheck default; do
    taskset -c "$PROXY_CPU" "$bin" run --config "$TMP/$cfg.yaml" >"$TMP/$cfg.log" 2>&1 & pid=$!; PIDS+=($pid)
    sleep 10
    kill -0 "$pid" 2>/dev/null || { echo "$bin on $cfg exited: $(tail -n 3 "$TMP/$cfg.log")" >&2; exit 1; }
    t1=$(ticks $pid); w1=$(wakeups $pid)
    sleep 20
    t2=$(ticks $pid); w2=$(wakeups $pid)
    rss=$(awk '/^VmRSS/{print $2}' "/proc/$pid/status")
    kill "$pid"; wait "$pid" 2>/dev/null
    awk -v b="$bin" -v c="$cfg" -v t=$((t2 - t1)) -v w=$((w2 - w1)) -v r="$rss" -v hz="$(getconf CLK_TCK)" \
      'BEGIN { printf "| %s | %s | %.2f | %.1f | %s |\n", b, c, t / hz, w / 20, r }'
  done
done

echo
echo "keep-alive through the 'big' process (req/s, wrk -t1 -c32 -d5s):"
for r in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    taskset -c "$PROXY_CPU" "$bin" run --config "$TMP/bighttp.yaml" >"$TMP/bighttp.log" 2>&1 & pid=$!; PIDS+=($pid)
    sleep 8
    curl -sf "http://127.0.0.1:$((P+2))/" >/dev/null || { echo "$bin: no answer on the entrypoint" >&2; exit 1; }
    rps=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d5s "http://127.0.0.1:$((P+2))/" | awk '/^Requests\/sec/{print $2}')
    echo "round $r $bin: $rps"
    kill "$pid"; wait "$pid" 2>/dev/null
  done
done
