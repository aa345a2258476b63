# shellcheck shell=bash
# HTTP edge checks with external clients (sourced by run.sh after meshgate started; uses ok/bad/
# skip/have and $WORK, $BIN). Set-up: certs.pre.sh and http.yaml in this directory.
H=127.0.0.1:28100
C=(curl -sS --max-time 5)
wait_port 127.0.0.1 28100 || bad "http entrypoint 28100 did not open"

# Routing by Host: header, and by name with --resolve.
out=$("${C[@]}" -H 'Host: a.test' "http://$H/" 2>&1)
if [ "$out" = "b1" ]; then ok "curl Host: a.test routes to http-a"; else bad "Host a.test got '$out'"; fi
out=$("${C[@]}" --resolve b.test:28100:127.0.0.1 http://b.test:28100/ 2>&1)
if [ "$out" = "b2" ]; then ok "curl --resolve b.test routes to http-b"; else bad "b.test got '$out'"; fi

# PathPrefix without a host rule; on a.test it wins by its longer rule text (priority 0).
out=$("${C[@]}" -H 'Host: other.test' "http://$H/api/x" 2>&1)$("${C[@]}" -H 'Host: a.test' "http://$H/api/y" 2>&1)
if [ "$out" = "b2b2" ]; then ok "PathPrefix(/api) routes to http-b"; else bad "PathPrefix got '$out'"; fi

# No route: 404 with meshgate's body.
out=$("${C[@]}" -H 'Host: nope.test' -w ' %{http_code}' "http://$H/" 2>&1)
if [[ $out == *"no route"*" 404" ]]; then ok "no route answers 404 with a body"; else bad "no route: '$out'"; fi

# h2c with prior knowledge (and the original http.sh checks, folded in here).
out=$("${C[@]}" --http2-prior-knowledge -H 'Host: a.test' -w ' %{http_version}' "http://$H/" 2>&1 | tr -d '\n')
if [ "$out" = "b1 2" ]; then ok "curl --http2-prior-knowledge (h2c) routes by :authority"; else bad "h2c: '$out'"; fi

# X-Forwarded-For: a spoofed value from an untrusted peer is replaced by the real peer.
out=$("${C[@]}" -H 'Host: a.test' -H 'X-Forwarded-For: 6.6.6.6' "http://$H/echo" 2>&1)
xff=$(printf '%s' "$out" | python3 -c 'import json,sys; h=json.load(sys.stdin)["headers"]; print(",".join(h.get("x-forwarded-for", [])), ",".join(h.get("x-forwarded-proto", [])))' 2>&1)
if [ "$xff" = "127.0.0.1 http" ]; then ok "backend sees X-Forwarded-For 127.0.0.1 (spoofed value dropped)"; else bad "XFF: '$xff' from $out"; fi

# HTTPS: the certificate is chosen by SNI (each name only verifies against its own cert).
if [ -f "$WORK/ca.crt" ]; then
  out=$("${C[@]}" --cacert "$WORK/ca.crt" --resolve a.test:28143:127.0.0.1 https://a.test:28143/ 2>&1)
  out2=$("${C[@]}" --cacert "$WORK/ca.crt" --resolve b.test:28143:127.0.0.1 https://b.test:28143/ 2>&1)
  if [ "$out$out2" = "b1b2" ]; then ok "HTTPS with SNI a.test and b.test verifies and routes"; else bad "HTTPS SNI: '$out' '$out2'"; fi
  subj=$(openssl s_client -connect 127.0.0.1:28143 -servername b.test </dev/null 2>/dev/null | openssl x509 -noout -subject 2>&1)
  if [[ $subj == *"CN = b.test"* || $subj == *"CN=b.test"* ]]; then ok "openssl s_client -servername b.test gets the b.test certificate"; else bad "SNI cert: '$subj'"; fi
  out=$("${C[@]}" --http2 --cacert "$WORK/ca.crt" --resolve a.test:28143:127.0.0.1 -w ' %{http_version}' https://a.test:28143/ 2>&1 | tr -d '\n')
  if [ "$out" = "b1 2" ]; then ok "curl --http2 over TLS negotiates h2 by ALPN"; else bad "h2 over TLS: '$out'"; fi
  out=$("${C[@]}" --http1.1 --cacert "$WORK/ca.crt" --resolve a.test:28143:127.0.0.1 "https://a.test:28143/echo" 2>&1 \
    | python3 -c 'import json,sys; h=json.load(sys.stdin)["headers"]; print(h["x-forwarded-proto"][0])' 2>&1)
  if [ "$out" = "https" ]; then ok "backend sees X-Forwarded-Proto https"; else bad "XFP over TLS: '$out'"; fi

  # Redirect http -> https (308, port kept from redirect_port), then follow it.
  out=$("${C[@]}" -o /dev/null -H 'Host: a.test' -w '%{http_code} %{redirect_url}' "http://127.0.0.1:28101/p?q=1" 2>&1)
  if [ "$out" = "308 https://a.test:28143/p?q=1" ]; then ok "http entrypoint redirects to https (308)"; else bad "redirect: '$out'"; fi
  out=$("${C[@]}" -L --cacert "$WORK/ca.crt" --resolve a.test:28101:127.0.0.1 --resolve a.test:28143:127.0.0.1 http://a.test:28101/ 2>&1)
  if [ "$out" = "b1" ]; then ok "curl -L follows the redirect to https"; else bad "redirect follow: '$out'"; fi

  # TLS passthrough: the backend's own certificate reaches the client, routed by SNI.
  wait_port 127.0.0.1 28144
  subj=$(openssl s_client -connect 127.0.0.1:28144 -servername pt.test </dev/null 2>/dev/null | openssl x509 -noout -subject 2>&1)
  if [[ $subj == *"pt.test"* ]]; then ok "openssl s_client through tls_passthrough sees the backend certificate"; else bad "passthrough cert: '$subj'"; fi
  out=$("${C[@]}" --cacert "$WORK/ca.crt" --resolve pt.test:28144:127.0.0.1 https://pt.test:28144/ 2>&1)
  if [ "$out" = "pt" ]; then ok "curl through tls_passthrough reaches the TLS backend"; else bad "passthrough curl: '$out'"; fi
  out=$(openssl s_client -connect 127.0.0.1:28144 -servername unknown.test </dev/null 2>&1 | grep -c "BEGIN CERTIFICATE")
  if [ "$out" = "0" ]; then ok "tls_passthrough closes an unknown SNI"; else bad "passthrough unknown SNI got a certificate"; fi
else
  bad "no test certificates (openssl missing?)"
fi

# WebSocket: handshake and one masked frame echoed (stdlib sockets).
if python3 - <<'PY'
import base64, hashlib, os, socket
s = socket.create_connection(("127.0.0.1", 28100), timeout=5)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    b = s.recv(1)
    assert b, head
    head += b
lines = head.decode().split("\r\n")
assert lines[0].startswith("HTTP/1.1 101"), lines
want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
assert any(l.lower() == "sec-websocket-accept: " + want.lower() for l in lines), lines
payload = b"hello through meshgate"
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def read(n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        assert b, out
        out += b
    return out
h = read(2)
assert h[0] == 0x81 and h[1] & 0x80 == 0, h
assert read(h[1] & 0x7F) == payload
PY
then ok "WebSocket handshake and a masked frame echoed through the http entrypoint"; else bad "WebSocket"; fi

# h2load: bounded runs, 0 failed requests, every response 2xx.
h2check() { # name url [extra args]
  local name=$1 url=$2; shift 2
  local out
  out=$(timeout 60 h2load -n 2000 -c 10 -m 10 "$@" "$url" 2>&1)
  if grep -q "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored" <<<"$out" \
     && grep -q "status codes: 2000 2xx" <<<"$out"; then
    ok "h2load $name: 2000 requests, 0 failed ($(echo "$out" | grep -o 'finished in.*'))"
  else bad "h2load $name: $out"; fi
}
if have h2load; then
  h2check "h2c" "http://$H/api/h2load"
  h2check "h2 over TLS" "https://127.0.0.1:28143/api/h2load"
else skip "h2load not installed (apt-get install nghttp2-client)"; fi

# gRPC with grpcio: unary and bidirectional streaming, raw-bytes (identity) serializers,
# over h2c and over TLS. apt's python3-grpcio lands in /usr/bin/python3, which may not be first.
PYGRPC=""
for py in python3 /usr/bin/python3; do
  if have "$py" && "$py" -c 'import grpc' 2>/dev/null; then PYGRPC=$py; break; fi
done
if [ -n "$PYGRPC" ]; then
  if CA="$WORK/ca.crt" timeout 30 "$PYGRPC" - <<'PY'
import os, grpc
def check(channel, label):
    unary = channel.unary_unary("/meshgate.Echo/Unary", request_serializer=None, response_deserializer=None)
    got = unary(b"ping " + label.encode(), timeout=5)
    assert got == b"ping " + label.encode(), got
    stream = channel.stream_stream("/meshgate.Echo/Stream", request_serializer=None, response_deserializer=None)
    msgs = [b"m%d-" % i + os.urandom(i * 100) for i in range(20)]
    got = list(stream(iter(msgs), timeout=5))
    assert got == msgs, (len(got), len(msgs))
check(grpc.insecure_channel("127.0.0.1:28100"), "h2c")
creds = grpc.ssl_channel_credentials(root_certificates=open(os.environ["CA"], "rb").read())
check(grpc.secure_channel("127.0.0.1:28143", creds, options=[("grpc.ssl_target_name_override", "a.test")]), "tls")
PY
  then ok "gRPC unary + bidi stream (grpcio) over h2c and TLS"; else bad "gRPC through meshgate"; fi
else skip "python grpcio not installed (apt-get install python3-grpcio)"; fi
