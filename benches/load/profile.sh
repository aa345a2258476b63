#!/usr/bin/env bash
# Profile meshgate on the L7 keep-alive scenario: nginx backend + meshgate (1 worker) pinned to
# PROXY_CPU, wrk pinned to LOAD_CPU, `perf record` (cpu-clock, works in VMs without PMU) on the
# meshgate PID for the duration of the load. Prints the top self-time symbols.
# Needs: linux-perf, nginx, wrk; target/release/meshgate (release profile keeps debug=1).
# Usage: benches/load/profile.sh [seconds]   (default 10); STRACE=1 for syscall counts instead;
#        MODE=h2 profiles HTTP/2 over TLS (h2load -c64 -m10, needs nghttp2-client, openssl) instead;
#        MODE=l4 profiles keep-alive HTTP through an L4 TCP port (wrk; the l4-rr scenario);
#        SAVE=FILE keeps a copy of perf.data.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
SECS=${1:-10}; LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-25000}
for t in perf nginx wrk; do command -v $t >/dev/null || { echo "missing $t (apt-get install linux-perf nginx wrk)" >&2; exit 3; }; done
. "$HERE/common.sh"
lb_tmp meshgate-prof
MODE=${MODE:-http}
if [ "$MODE" = h2 ]; then
  command -v h2load >/dev/null || { echo "missing h2load (apt-get install nghttp2-client)" >&2; exit 3; }
  lb_cert
  KIND=https; URL="https://127.0.0.1:$((P+2))/"
  loadgen() { taskset -c "$LOAD_CPU" h2load -t1 -c64 -m10 -D "$1" "$URL"; }
else
  KIND=http; URL="http://127.0.0.1:$((P+2))/"
  loadgen() { taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${1}s" "$URL"; }
fi
if [ "$MODE" = l4 ]; then
  lb_l4_config $((P+2)) >"$TMP/m.yaml"
else
  lb_config $((P+2)) "$KIND" >"$TMP/m.yaml"
fi
lb_backend
TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" "$REPO/target/release/meshgate" run --config "$TMP/m.yaml" & MG=$!; PIDS+=($MG)
sleep 1
loadgen 1 >/dev/null
if [ "${STRACE:-0}" = 1 ]; then
  # Syscalls per request instead of a profile (strace slows meshgate; only the counts matter).
  timeout "$SECS" strace -c -f -p "$MG" -o "$TMP/strace.txt" & ST=$!
  loadgen "$SECS" | tee "$TMP/wrk.txt"
  wait "$ST"; cat "$TMP/strace.txt"; exit 0
fi
perf record -e cpu-clock -F 1999 --call-graph "${CG:-fp}" -p "$MG" -o "$TMP/perf.data" -- sleep "$SECS" 2>/dev/null & PERF=$!
loadgen "$SECS"
wait "$PERF"
echo "== top symbols by self time (meshgate, $MODE keep-alive) =="
[ -n "${SAVE:-}" ] && cp "$TMP/perf.data" "$SAVE"
rep() { perf report -i "$TMP/perf.data" --no-children -g none --stdio "$@" 2>/dev/null | grep -E '^ +[0-9]' | sed 's/  *$//' ; }
rep --sort symbol | head -"${TOP:-40}"
echo "== by shared object =="; rep --sort dso | head -8
echo "== by thread =="; rep --sort comm | head -8
echo "== meshgate binary only (userspace Rust: meshgate, hyper, tokio, http, rustls) =="
rep --sort symbol --dsos meshgate | head -25
echo "== syscalls entered (kernel entry points by caller) =="
perf report -i "$TMP/perf.data" --children -g none --stdio --sort symbol 2>/dev/null | grep -E '^ +[0-9].*(__x64_sys|do_syscall)' | sed 's/  *$//' | head -15
if [ -n "${CALLERS:-}" ]; then
  # CALLERS=sym1,sym2: who calls these symbols (caller call chains, folded).
  IFS=, read -ra syms <<<"$CALLERS"
  for s in "${syms[@]}"; do
    echo "== callers of $s =="
    perf report -i "$TMP/perf.data" --no-children -G --stdio --symbols "$s" -g caller,0.5,callee,function,percent --no-inline 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -60
  done
fi
if [ -n "${INCLUSIVE:-}" ]; then
  # INCLUSIVE=regex: inclusive (children) share of the symbols matching it.
  echo "== inclusive time of symbols matching $INCLUSIVE =="
  perf report -i "$TMP/perf.data" --children -g none --stdio --sort symbol 2>/dev/null |
    grep -E '^ +[0-9]' | grep -E "$INCLUSIVE" | sed 's/  *$//' | cut -c1-170 | head -40
fi
