#!/bin/sh
# Build the meshgate image offline: static binaries from the local toolchain, then a
# `FROM scratch` image (no base image is pulled, no registry is needed).
#
#   docker/build-image.sh [TAG]        (default tag: meshgate:latest)
#
# Needs: cargo with the x86_64-unknown-linux-gnu target (the host target) and a Docker engine.
set -eu
tag="${1:-meshgate:latest}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
target=x86_64-unknown-linux-gnu
out="$repo/target/$target/release"

cd "$repo"
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --target "$target" --bin meshgate --bin meshgate-echo

for bin in meshgate meshgate-echo; do
  # A dynamic binary would start in the image and fail with "no such file" (no loader).
  if ! file "$out/$bin" | grep -q 'static'; then
    echo "build-image.sh: $out/$bin is not statically linked" >&2
    exit 1
  fi
done

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$out/meshgate" "$out/meshgate-echo" "$repo/docker/meshgate.yaml" "$ctx/"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY meshgate /meshgate
COPY meshgate-echo /meshgate-echo
COPY meshgate.yaml /etc/meshgate/meshgate.yaml
ENTRYPOINT ["/meshgate"]
CMD ["run", "--config", "/etc/meshgate/meshgate.yaml"]
DOCKERFILE
# `FROM scratch` pulls nothing, so the classic builder works without network or registry.
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx"
echo "built $tag"
