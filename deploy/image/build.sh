#!/usr/bin/env bash
# Build flannel-bpf's container image from Debian packages and this checkout, with no registry:
#   1. a bookworm root file system of packages.txt, made by mmdebstrap from this host's apt
#      sources, imported as localhost/flannel-bpf-base:bookworm (skipped when it exists);
#   2. wheels of flannel-bpf and its Python dependencies, built on this host;
#   3. `docker build --network none` of the Containerfile: localhost/flannel-bpf:VERSION.
# Usage (as root): deploy/image/build.sh [-H DOCKER_HOST] [-o IMAGE.tar] [--rebuild-base]
#   -o writes the image with `docker save`, for `docker load` or `ctr -n k8s.io images import`
#   on nodes. Every step is bounded in time; the scratch directory is removed on any exit.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
repo=$(readlink -f "$here/../..")
docker=(docker)
out= rebuild_base=
while [ $# -gt 0 ]; do
  case "$1" in
    -H) docker+=(-H "$2"); shift 2 ;;
    -o) out=$2; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    *) echo "build.sh: unknown argument: $1 (usage: build.sh [-H DOCKER_HOST] [-o IMAGE.tar] [--rebuild-base])" >&2
       exit 2 ;;
  esac
done
say() { printf 'build image: %s\n' "$*"; }
die() { printf 'build image: error: %s\n' "$*" >&2; exit 1; }
bounded() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap)"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)
[ -n "$version" ] || die "no version in $repo/pyproject.toml"
base=localhost/flannel-bpf-base:bookworm
image=localhost/flannel-bpf:$version
bounded 30 "${docker[@]}" version >/dev/null 2>&1 || die "no docker daemon answers (${docker[*]} version)"

scratch=$(mktemp -d /tmp/flannel-bpf-image.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

if [ -n "$rebuild_base" ] || ! "${docker[@]}" image inspect "$base" >/dev/null 2>&1; then
  if ! command -v mmdebstrap >/dev/null; then
    say "installing mmdebstrap"
    bounded 300 apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null \
      || { bounded 300 apt-get update -q >/dev/null && bounded 300 apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null; } \
      || die "could not install mmdebstrap"
  fi
  sources=
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -s "$candidate" ] && { sources=$candidate; break; }
  done
  [ -n "$sources" ] || die "no apt sources on this host to build the base from"
  packages=$(grep -v '^#' "$here/packages.txt" | xargs | tr ' ' ,)
  say "making the base root file system (bookworm: $packages) from $sources"
  bounded 1200 mmdebstrap --quiet --variant=minbase --include="$packages" bookworm "$scratch/rootfs.tar" "$sources" \
    || die "mmdebstrap failed"
  bounded 600 "${docker[@]}" import "$scratch/rootfs.tar" "$base" >/dev/null || die "docker import failed"
  rm -f "$scratch/rootfs.tar"
fi

# The wheels must fit the image's Python (bookworm's 3.11): they are built by this host's
# Debian Python in a scratch venv (some dependencies are published as source only).
image_python=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || true
[ "$image_python" = 3.11 ] || die "the wheels are built with /usr/bin/python3, which must be 3.11 as in bookworm (it is '${image_python:-missing}')"
say "building wheels of flannel-bpf $version and its dependencies"
bounded 300 /usr/bin/python3 -m venv "$scratch/pip-venv" || die "no venv from /usr/bin/python3 (python3-venv)"
mkdir -p "$scratch/context/wheels"
bounded 900 "$scratch/pip-venv/bin/pip" wheel -qq --disable-pip-version-check --wheel-dir "$scratch/context/wheels" \
  "$repo" || die "pip wheel failed"
cp "$here/Containerfile" "$scratch/context/Containerfile"

say "building $image"
DOCKER_BUILDKIT=0 bounded 900 "${docker[@]}" build --quiet --network none --build-arg "BASE=$base" -t "$image" \
  -f "$scratch/context/Containerfile" \
  "$scratch/context" >/dev/null || die "docker build failed"
if [ -n "$out" ]; then
  bounded 600 "${docker[@]}" save -o "$out" "$image" || die "docker save failed"
  say "saved $image to $out"
fi
say "built $image"
