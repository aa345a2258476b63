# shellcheck shell=bash
# HTTP edge set-up (sourced by run.sh before meshgate starts): a test CA, server certificates for
# a.test and b.test (served by meshgate, chosen by SNI) and pt.test (served by a TLS backend
# behind a tls_passthrough entrypoint), and that TLS backend.
# Ports: 28100 http (h1 + h2c), 28101 http redirecting to https, 28143 https, 28144 passthrough,
# 28141 the TLS echo backend.
if have openssl; then
  mkcert() { # name -> $WORK/name.crt, $WORK/name.key signed by the test CA
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$WORK/$1.key" -subj "/CN=$1" -out "$WORK/$1.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\n' "$1" >"$WORK/$1.ext"
    openssl x509 -req -in "$WORK/$1.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
      -CAcreateserial -days 2 -extfile "$WORK/$1.ext" -out "$WORK/$1.crt" 2>/dev/null
  }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$WORK/ca.key" -out "$WORK/ca.crt" -subj "/CN=meshgate interop CA" 2>/dev/null
  for n in a.test b.test pt.test; do mkcert "$n"; done
  # meshgate does not need openssl's PKCS#8 choice, but rustls-pemfile reads all of them.
else
  echo "SKIP: openssl not installed: HTTPS checks will fail to load certificates"
fi
$BIN/meshgate-echo --name pt --https 127.0.0.1:28141 --cert "$WORK/pt.test.crt" --key "$WORK/pt.test.key" \
  >"$WORK/pt.log" 2>&1 & PIDS+=($!)
