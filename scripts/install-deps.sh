#!/usr/bin/env bash
# Installs, from Debian's archive, every package the gateway needs to build, run
# its demo and pass its tests; does nothing when all are present. Runs apt-get
# as root (through sudo when not root). Services that packages would start on
# install (nginx, redis, postgresql, prometheus) are kept from starting: the
# tests and the demo start their own on loopback.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libevent-dev libyaml-dev libssl-dev zlib1g-dev libbrotli-dev libhiredis-dev libpq-dev libjemalloc-dev
  libcmocka-dev clang clang-format libclang-rt-14-dev
  python3 python3-pytest python3-requests
  nginx-light wrk prometheus redis-server postgresql pgbouncer curl openssl procps yamllint
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"

# policy-rc.d answering 101 keeps invoke-rc.d from starting services during install.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

# An install cut short earlier leaves dpkg half-configured and apt-get refusing.
$sudo env DEBIAN_FRONTEND=noninteractive dpkg --configure -a
$sudo apt-get update
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
