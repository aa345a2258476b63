#!/usr/bin/env bash
# A/B two meshgate binaries on the same machine in the same run: interleaved rounds (A B A B …)
# of wrk (HTTP/1.1 keep-alive; `close`: a new connection per request; `l4`: keep-alive through
# an L4 TCP port; `h1tls`: HTTP/1.1 keep-alive over TLS) or h2load (`h2`: HTTP/2 over TLS),
# medians and the ratio B/A.
# Same setup as run.sh: nginx backend and both proxies (1 worker) pinned to PROXY_CPU, the load
# generator to LOAD_CPU, loopback only, every process stopped by PID on exit.
# Usage: benches/load/ab.sh BIN_A BIN_B [http|close|h2|h1tls|l4] [rounds] [seconds]
# THREADS=N (default 1): N worker threads per proxy and N load threads with 64*N connections;
# with N > 1 nothing is pinned (proxies, backend and load share every core).
set -u -o pipefail
A=$1; B=$2; MODE=${3:-http}; ROUNDS=${4:-5}; SECS=${5:-4}
LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-26000}
THREADS=${THREADS:-1}; C=$((64 * THREADS))
if [ "$THREADS" -gt 1 ]; then ALL=$(seq -s, 0 $(($(nproc) - 1))); LOAD_CPU=$ALL; PROXY_CPU=$ALL; fi
for t in nginx wrk h2load openssl; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
. "$(cd "$(dirname "$0")" && pwd)/common.sh"
lb_tmp meshgate-ab
lb_cert
KIND=http; SCHEME=http
case $MODE in h2|h1tls) KIND=https; SCHEME=https ;; esac
CLOSE=; [ "$MODE" = close ] && CLOSE=1
if [ "$MODE" = l4 ]; then
  lb_l4_config $((P+2)) >"$TMP/a.yaml"; lb_l4_config $((P+3)) >"$TMP/b.yaml"
else
  lb_config $((P+2)) "$KIND" >"$TMP/a.yaml"; lb_config $((P+3)) "$KIND" >"$TMP/b.yaml"
fi
lb_backend
TOKIO_WORKER_THREADS=$THREADS taskset -c "$PROXY_CPU" "$A" run --config "$TMP/a.yaml" & PIDS+=($!)
TOKIO_WORKER_THREADS=$THREADS taskset -c "$PROXY_CPU" "$B" run --config "$TMP/b.yaml" & PIDS+=($!)
sleep 1
run() { # port seconds -> req/s
  if [ "$MODE" = h2 ]; then
    taskset -c "$LOAD_CPU" h2load -t"$THREADS" -c"$C" -m10 -D "$2" "https://127.0.0.1:$1/" 2>&1 |
      sed -n 's/.*finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p'
  else
    taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$C" -d"${2}s" ${CLOSE:+-H "Connection: close"} "$SCHEME://127.0.0.1:$1/" |
      sed -n 's/^Requests\/sec: *//p'
  fi
}
run $((P+2)) 1 >/dev/null; run $((P+3)) 1 >/dev/null
ra=(); rb=()
for r in $(seq "$ROUNDS"); do
  a=$(run $((P+2)) "$SECS"); b=$(run $((P+3)) "$SECS")
  echo "round $r: A $a req/s, B $b req/s"
  ra+=("$a"); rb+=("$b")
done
python3 - "${ra[*]}" "${rb[*]}" <<'EOF'
import sys, statistics
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"median A {ma:.0f} req/s, B {mb:.0f} req/s, B/A {mb / ma:.3f}")
EOF
