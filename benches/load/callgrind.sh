#!/usr/bin/env bash
# User-space instructions per request of meshgate builds, counted by callgrind: repeatable for
# the same binary and load whatever else the machine does, unlike req/s on a shared 2-core VM.
# Each binary runs under `valgrind --tool=callgrind` (1 worker) in front of the nginx "ok"
# backend; h2load warms it up with 2,000 requests, the counters are zeroed, N more requests
# run, the counters are dumped: Ir / N. Kernel time is not counted (that is what run.sh
# measures); for L4 most of the cost is the kernel's.
# Modes: http (HTTP/1.1 keep-alive, the fast path), h2 (HTTP/2 over TLS, -m10: TLS handshakes
# of the C connections are counted too, so keep N large), l4 (keep-alive HTTP/1.1 through an
# L4 TCP port), close (a new connection per request: wrk with `Connection: close` for N
# seconds instead of N requests, 16 connections; Ir / the requests wrk counted).
# Needs: valgrind, nginx, h2load (nghttp2-client), wrk (close), openssl, curl.
# Usage: benches/load/callgrind.sh MODE N BIN...   (e.g. http 30000 /tmp/mg-old target/release/meshgate)
#        C=connections (64), KEEP=DIR keeps each callgrind.out for callgrind_annotate.
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODE=${1:?mode: http, h2 or l4}; N=${2:?requests}; shift 2
[ $# -gt 0 ] || { echo "usage: $0 MODE N BIN..." >&2; exit 2; }
for t in valgrind callgrind_control nginx h2load openssl curl; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install valgrind nginx nghttp2-client openssl curl)" >&2; exit 3; }
done
LOAD_CPU=${LOAD_CPU:-0}; PROXY_CPU=${PROXY_CPU:-1}; P=${BASE_PORT:-25500}
. "$HERE/common.sh"
lb_tmp meshgate-cg
lb_cert
M=1; H1=--h1; SCHEME=http
case $MODE in
  http) lb_config $((P+2)) http >"$TMP/m.yaml" ;;
  close) lb_config $((P+2)) http >"$TMP/m.yaml"; command -v wrk >/dev/null || { echo "missing wrk" >&2; exit 3; } ;;
  h2) lb_config $((P+2)) https >"$TMP/m.yaml"; M=10; H1=; SCHEME=https ;;
  l4) lb_l4_config $((P+2)) >"$TMP/m.yaml" ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
URL="$SCHEME://127.0.0.1:$((P+2))/"
lb_backend
load() { # requests (close: seconds) -> succeeded
  if [ "$MODE" = close ]; then
    local secs=$1; [ "$secs" -gt 60 ] && secs=2 # the warm-up asks for 2,000 "requests"
    taskset -c "$LOAD_CPU" wrk -t1 -c"${C:-16}" -d"${secs}s" -H "Connection: close" "$URL" |
      awk '/ requests in / {print $1}'
    return
  fi
  taskset -c "$LOAD_CPU" h2load $H1 -t1 -c"${C:-64}" -m$M -n "$1" "$URL" 2>&1 |
    awk '/^requests:/ {print $8}'
}
for bin in "$@"; do
  out="$TMP/cg.$(basename "$bin").out"
  TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin" run --config "$TMP/m.yaml" 2>"$TMP/valgrind.log" & VG=$!
  up=0
  for _ in $(seq 120); do sleep 0.5; curl -sk -o /dev/null "$URL" && { up=1; break; }; done
  [ $up = 1 ] || { echo "$bin did not come up under valgrind:" >&2; tail -20 "$TMP/valgrind.log" >&2; kill $VG; exit 1; }
  load 2000 >/dev/null
  callgrind_control -z $VG >/dev/null
  ok=$(load "$N")
  callgrind_control -d $VG >/dev/null
  sleep 1
  kill $VG; wait $VG 2>/dev/null
  dump=$(ls -t "$out".* | head -1)
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  [ "${ok:-0}" -gt 0 ] || { echo "$bin: no request succeeded" >&2; exit 1; }
  echo "$MODE $bin: $ok requests, $ir instructions, $((ir / ok)) per request"
  [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$dump" "$KEEP/callgrind.$(basename "$bin").$MODE.out"
done
