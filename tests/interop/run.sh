#!/usr/bin/env bash
# Interop checks with external clients against the real binaries on loopback.
# Each check prints PASS/FAIL; the script ends with "N passed, N failed" and exits non-zero on
# any failure. Missing clients are reported as SKIP (CI installs them with apt-get).
set -uo pipefail
cd "$(dirname "$0")/../.."
# MESHGATE_BIN_DIR=target/debug reuses already built binaries (quick local runs).
if [ -n "${MESHGATE_BIN_DIR:-}" ]; then BIN=$MESHGATE_BIN_DIR; else
  cargo build --release --bins -q
  BIN=target/release
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null
  if [ "$fail" -ne 0 ] && [ -f "$WORK/mg.log" ]; then echo "--- meshgate log (tail)"; tail -n 40 "$WORK/mg.log"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
pass=0; fail=0
ok()   { echo "PASS: $1"; pass=$((pass+1)); }
bad()  { echo "FAIL: $1"; fail=$((fail+1)); }
skip() { echo "SKIP: $1"; }
have() { command -v "$1" >/dev/null 2>&1; }
# Wait (bounded, 5 s) until a TCP port accepts connections.
wait_port() { for _ in $(seq 50); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# Merge YAML files whose top-level keys are block maps (`services:` then indented entries) or
# one-line values: entries of a block key defined in several files end up under one key, so
# each fragment can add its own services, entrypoints and routers.
merge_yaml() {
  awk '
    /^[A-Za-z_][A-Za-z0-9_]*:[ \t]*(#.*)?$/ { k=$1; sub(/:.*/, "", k); if (!(k in body)) order[n++]=k; cur=k; next }
    /^[A-Za-z_]/ { cur=""; flat[nf++]=$0; next }
    /^[ \t]*(#.*)?$/ { next }
    { if (cur != "") body[cur]=body[cur] $0 "\n"; else flat[nf++]=$0 }
    END { for (i=0; i<nf; i++) print flat[i]; for (i=0; i<n; i++) { print order[i] ":"; printf "%s", body[order[i]] } }
  ' "$@"
}

# Backends: two HTTP (h1 + h2c + gRPC + WebSocket), one TCP echo, one UDP echo.
$BIN/meshgate-echo --name b1 --http 127.0.0.1:28081 --tcp 127.0.0.1:28091 --udp 127.0.0.1:28093 >"$WORK/b1.log" 2>&1 & PIDS+=($!)
$BIN/meshgate-echo --name b2 --http 127.0.0.1:28082 >"$WORK/b2.log" 2>&1 & PIDS+=($!)

# Set-up contributed by the HTTP and DNS parts (certificates, extra backends): runs before
# meshgate starts, may append to PIDS.
for s in tests/interop/*.d/*.pre.sh; do
  [ -f "$s" ] || continue
  # shellcheck source=/dev/null
  . "$s"
done

cat >"$WORK/base.yaml" <<YAML
admin: { bind: 127.0.0.1:29901 }
services:
  web:
    ports: ["28080:80/tcp"]
    endpoints: ["127.0.0.1:28081", "127.0.0.1:28082"]
  echo:
    ports: ["28090:7/tcp"]
    endpoints: ["127.0.0.1:28091"]
  udpecho:
    ports: ["28092:7/udp"]
    endpoints: ["127.0.0.1:28093"]
YAML
# Fragments may name files of the run's work dir as @WORK@.
for f in tests/interop/*.d/*.yaml; do [ -f "$f" ] && sed "s#@WORK@#$WORK#g" "$f" >"$WORK/frag.$(basename "$(dirname "$f")").$(basename "$f")"; done
merge_yaml "$WORK/base.yaml" "$WORK"/frag.*.yaml >"$WORK/mg.yaml" 2>/dev/null || cp "$WORK/base.yaml" "$WORK/mg.yaml"
$BIN/meshgate run --config "$WORK/mg.yaml" >"$WORK/mg.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do curl -sf http://127.0.0.1:29901/healthz >/dev/null 2>&1 && break; sleep 0.1; done
if ! curl -sf --max-time 2 http://127.0.0.1:29901/healthz >/dev/null; then
  echo "meshgate did not start; config and log:"; cat "$WORK/mg.yaml" "$WORK/mg.log"
fi
# Listeners that could not bind are a failure of the whole set-up.
failed=$(curl -s --max-time 2 http://127.0.0.1:29901/api/status | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["listeners_failed"]))' 2>&1)
if [ -z "$failed" ]; then ok "every configured listener is open"; else bad "listeners failed to bind: $failed"; fi

# meshgate check: valid and invalid configs.
out=$($BIN/meshgate check --config "$WORK/mg.yaml" 2>&1)
if grep -q "config OK" <<<"$out"; then ok "check accepts a valid config"; else bad "check valid"; fi
printf 'services:\n  a:\n    ports: ["9"]\n    policy: fastest\n' >"$WORK/bad.yaml"
out=$($BIN/meshgate check --config "$WORK/bad.yaml" 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -q "fastest" <<<"$out" && grep -q "4" <<<"$out"; then ok "check rejects a bad config naming key and line"; else bad "check invalid: rc=$rc $out"; fi

# L4 TCP through curl: both backends answer (round robin).
names=$(for i in 1 2 3 4; do curl -s --max-time 3 http://127.0.0.1:28080/; done | sort -u | tr '\n' ' ')
if [ "$names" = "b1 b2 " ]; then ok "curl through L4 TCP reaches both endpoints"; else bad "L4 curl got '$names'"; fi

# TCP echo with half-close via python (stdlib sockets).
if python3 - <<'PY'
import socket
s = socket.create_connection(("127.0.0.1", 28090), timeout=3)
s.sendall(b"x" * 100000); s.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = s.recv(65536)
    if not b: break
    got += b
assert len(got) == 100000, len(got)
PY
then ok "TCP echo with half-close"; else bad "TCP echo half-close"; fi

# UDP echo round trip.
if python3 - <<'PY'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(b"ping", ("127.0.0.1", 28092))
assert s.recvfrom(100)[0] == b"ping"
PY
then ok "UDP round trip"; else bad "UDP round trip"; fi

# Metrics scrape.
if grep -q 'meshgate_endpoint_connections_total{service="web"' <<<"$(curl -s http://127.0.0.1:29901/metrics)"; then ok "Prometheus metrics"; else bad "metrics"; fi

# wrk, bounded: 2 s of keep-alive-less HTTP through the L4 port.
if have wrk; then
  wrk -t1 -c8 -d2s http://127.0.0.1:28080/ >"$WORK/wrk.txt" 2>&1
  if grep -q "Requests/sec" "$WORK/wrk.txt"; then
    errs=$(grep -c "Socket errors" "$WORK/wrk.txt" || true)
    if [ "$errs" = "0" ]; then ok "wrk through L4 without socket errors"; else bad "wrk socket errors: $(cat "$WORK/wrk.txt")"; fi
  else bad "wrk"; fi
else skip "wrk not installed"; fi

# Extra checks contributed by the HTTP and DNS parts.
for s in tests/interop/*.d/*.sh; do
  [ -f "$s" ] || continue
  case "$s" in *.pre.sh) continue ;; esac
  # shellcheck source=/dev/null
  . "$s"
done

echo "interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
