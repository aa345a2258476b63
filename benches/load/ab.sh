#!/usr/bin/env bash
# A/B two meshgate binaries on the same machine in the same run: interleaved rounds (A B, B A, …)
# of wrk (HTTP/1.1 keep-alive; `close`: a new connection per request; `l4`: keep-alive through
# an L4 TCP port; `l4close`: a new L4 connection, and so a new upstream one, per request;
# `h1tls`: HTTP/1.1 keep-alive over TLS) or h2load (`h2`: HTTP/2 over TLS),
# medians and the ratio B/A.
# Same setup as run.sh: nginx backend and both proxies (1 worker) pinned to PROXY_CPU, the load
# generator to LOAD_CPU, loopback only, every process stopped by PID on exit.
# `dns`: both as DNS servers of 1,000 names, dnsperf (4 sockets) at DNS_RATE queries/s (0, the
# default: as fast as it goes); compared by server CPU µs per answered query (lower is better).
# `bulk`: iperf3 (STREAMS streams, default 1) through an L4 port to `iperf3 -s`, in Gbit/s, with
# a direct round (no proxy) beside each A B pair for scale. No nginx for dns and bulk.
# Usage: benches/load/ab.sh BIN_A BIN_B [http|close|h2|h1tls|l4|l4close|dns|bulk] [rounds] [seconds]
# THREADS=N (default 1): N worker threads per proxy and N load threads with 64*N connections;
# with N > 1 nothing is pinned (proxies, backend and load share every core).
# A_EXTRA / B_EXTRA='upstream_congestion: cubic': top-level YAML appended to A's or B's config.
set -u -o pipefail
A=$1; B=$2; MODE=${3:-http}; ROUNDS=${4:-5}; SECS=${5:-4}
LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-26000}
THREADS=${THREADS:-1}; C=$((64 * THREADS))
if [ "$THREADS" -gt 1 ]; then ALL=$(seq -s, 0 $(($(nproc) - 1))); LOAD_CPU=$ALL; PROXY_CPU=$ALL; fi
# The nginx backend serves the HTTP modes (and l4/l4close); dns and bulk have their own servers.
case $MODE in dns) NEED="dnsperf python3" ;; bulk) NEED="iperf3 python3" ;; *) NEED="nginx wrk h2load openssl python3" ;; esac
for t in $NEED; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 3; }; done
. "$(cd "$(dirname "$0")" && pwd)/common.sh"
lb_tmp meshgate-ab
case $MODE in dns|bulk) ;; *) lb_cert ;; esac
KIND=http; SCHEME=http
case $MODE in h2|h1tls) KIND=https; SCHEME=https ;; esac
CLOSE=; case $MODE in close|l4close) CLOSE=1 ;; esac
if [ "$MODE" = l4 ] || [ "$MODE" = l4close ]; then
  lb_l4_config $((P+2)) >"$TMP/a.yaml"; lb_l4_config $((P+3)) >"$TMP/b.yaml"
elif [ "$MODE" = bulk ]; then
  lb_l4_config $((P+2)) $((P+4)) >"$TMP/a.yaml"; lb_l4_config $((P+3)) $((P+4)) >"$TMP/b.yaml"
  taskset -c "$PROXY_CPU" iperf3 -s -B 127.0.0.1 -p $((P+4)) >/dev/null 2>&1 & PIDS+=($!)
elif [ "$MODE" = dns ]; then
  lb_dns_config $((P+2)) >"$TMP/a.yaml"; lb_dns_config $((P+3)) >"$TMP/b.yaml"
  for i in $(seq 0 999); do echo "s$i.meshgate A"; done >"$TMP/queries.txt"
else
  lb_config $((P+2)) "$KIND" >"$TMP/a.yaml"; lb_config $((P+3)) "$KIND" >"$TMP/b.yaml"
fi
# A_EXTRA / B_EXTRA: YAML lines appended to one side's config, to A/B a setting with one binary.
[ -n "${A_EXTRA:-}" ] && printf '%s\n' "$A_EXTRA" >>"$TMP/a.yaml"
[ -n "${B_EXTRA:-}" ] && printf '%s\n' "$B_EXTRA" >>"$TMP/b.yaml"
case $MODE in dns|bulk) ;; *) lb_backend ;; esac
TOKIO_WORKER_THREADS=$THREADS taskset -c "$PROXY_CPU" "$A" run --config "$TMP/a.yaml" & PIDS+=($!); PA=$!
TOKIO_WORKER_THREADS=$THREADS taskset -c "$PROXY_CPU" "$B" run --config "$TMP/b.yaml" & PIDS+=($!); PB=$!
sleep 1
ticks() { cat /proc/"$1"/task/*/stat | awk '{s += $14 + $15} END {print s}'; } # utime+stime, all threads
UNIT="req/s"; [ "$MODE" = dns ] && UNIT="us/query"; [ "$MODE" = bulk ] && UNIT="Gbit/s"
run() { # port seconds -> req/s (dns: server CPU us per answered query)
  if [ "$MODE" = dns ]; then
    local pid=$PA c0 c1 q; [ "$1" = $((P+3)) ] && pid=$PB
    c0=$(ticks "$pid")
    q=$(taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p "$1" -d "$TMP/queries.txt" -l "$2" -c 4 -T 1 -q 200 \
      $( [ "${DNS_RATE:-0}" != 0 ] && echo "-Q $DNS_RATE") 2>&1 | sed -n 's/^ *Queries per second: *\([0-9.]*\).*/\1/p')
    c1=$(ticks "$pid")
    python3 -c "q=${q:-0}*$2; print(round(($c1-$c0)*1e4/q, 3) if q else 0)"
  elif [ "$MODE" = bulk ]; then
    taskset -c "$LOAD_CPU" iperf3 -c 127.0.0.1 -p "$1" -P "${STREAMS:-1}" -t "$2" -J 2>/dev/null | python3 -c '
import json, sys
try: print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9, 3))
except Exception: print(0)'
  elif [ "$MODE" = h2 ]; then
    taskset -c "$LOAD_CPU" h2load -t"$THREADS" -c"$C" -m10 -D "$2" "https://127.0.0.1:$1/" 2>&1 |
      sed -n 's/.*finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p'
  else
    taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$C" -d"${2}s" ${CLOSE:+-H "Connection: close"} "$SCHEME://127.0.0.1:$1/" |
      sed -n 's/^Requests\/sec: *//p'
  fi
}
run $((P+2)) 1 >/dev/null; run $((P+3)) 1 >/dev/null
ra=(); rb=(); ca=(); cb=(); rd=()
# One round of PORT's proxy (PID) for SECS: the rate, and (except dns) the proxy's CPU µs per
# request from its utime+stime over the round; steadier than req/s on a machine whose speed
# drifts between rounds.
round_of() { # port pid -> "rate cpu"
  local t0 t1 v; t0=$(ticks "$2"); v=$(run "$1" "$SECS"); t1=$(ticks "$2")
  if [ "$MODE" = dns ]; then echo "$v $v"; else
    python3 -c "v=float('${v:-0}' or 0); print('$v', round(($t1-$t0)*1e4/(v*$SECS), 2) if v else 0)"; fi
}
# The order within a round rotates (A B [direct], B [direct] A, [direct] A B, ...): neither side
# always runs first, after the other, or right after the direct round.
for r in $(seq "$ROUNDS"); do
  sides=(a b); [ "$MODE" = bulk ] && sides=(a b d)
  k=$(((r - 1) % ${#sides[@]})); order="${sides[*]:k} ${sides[*]:0:k}"
  for side in $order; do
    case $side in
      a) read -r a cpa <<<"$(round_of $((P+2)) "$PA")" ;;
      b) read -r b cpb <<<"$(round_of $((P+3)) "$PB")" ;;
      d) d=$(run $((P+4)) "$SECS"); rd+=("$d") ;;
    esac
  done
  order=$(echo $order | tr 'abd' 'ABd' | sed 's/d/direct/')
  if [ "$MODE" = dns ]; then echo "round $r ($order): A $a $UNIT, B $b $UNIT"
  elif [ "$MODE" = bulk ]; then
    echo "round $r ($order): A $a $UNIT ($cpa CPU-us per Gbit), B $b $UNIT ($cpb CPU-us per Gbit), direct $d"
  else echo "round $r ($order): A $a $UNIT ($cpa us/req), B $b $UNIT ($cpb us/req)"; fi
  ra+=("$a"); rb+=("$b"); ca+=("$cpa"); cb+=("$cpb")
done
python3 - "${ra[*]}" "${rb[*]}" "$UNIT" "${ca[*]}" "${cb[*]}" "${rd[*]:-}" <<'EOF2'
import sys, statistics
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]
ma, mb, unit = statistics.median(a), statistics.median(b), sys.argv[3]
f = ".0f" if unit == "req/s" else ".3f"
print(f"median A {ma:{f}} {unit}, B {mb:{f}} {unit}, B/A {mb / ma:.3f}")
if sys.argv[6].split():
    d = statistics.median(float(x) for x in sys.argv[6].split())
    print(f"median direct {d:.3f} {unit}: A {ma / d:.2f}x direct, B {mb / d:.2f}x direct")
if unit != "us/query":
    ca = [float(x) for x in sys.argv[4].split()]; cb = [float(x) for x in sys.argv[5].split()]
    pairs = sorted(y / x for x, y in zip(ca, cb) if x)
    per = "Gbit" if unit == "Gbit/s" else "req"
    print(f"proxy CPU us/{per}: median A {statistics.median(ca):.2f}, B {statistics.median(cb):.2f}, "
          f"B/A {statistics.median(cb) / statistics.median(ca):.3f}; per-round B/A median "
          f"{statistics.median(pairs):.3f} (range {pairs[0]:.3f}-{pairs[-1]:.3f})")
EOF2
