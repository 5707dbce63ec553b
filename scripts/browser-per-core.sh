#!/usr/bin/env bash
# Browser vs native training speed per core (issue #11): one server, one native
# worker on one thread, one tab lending one CPU core (a Web Worker on the wasm CPU
# backend); prints the samples/s of each and their ratio once the tab has 12 syncs.
#
#   scripts/browser-per-core.sh [path/to/tether] [port]
#   SERVE_ARGS="--model resnet8 --data ~/cifar-10-batches-bin" scripts/browser-per-core.sh
#   WASM=simd128 scripts/browser-per-core.sh    # the plain SIMD128 build in the tab
#   CONV=avx2 scripts/browser-per-core.sh       # the native worker's AVX2 kernel
#
# SERVE_ARGS go to `tether serve` (another network, other data); both workers get
# the network from the welcome and download their shards.
# Needs what scripts/test-all.sh installs (Debian's Chromium, playwright-core in
# tests/browser). Run it on an idle machine, several times, interleaved with the
# build it is compared with: the machine's noise is larger than one run shows.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(realpath "${1:-$root/target/release/tether}")"
port="${2:-18111}"
dir="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
cd "$dir"
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
"$bin" serve --port "$port" --tau 16 --screen-batch 0 ${SERVE_ARGS:-} >serve.log 2>&1 &
sleep 3
"$bin" work --server "ws://127.0.0.1:$port" --threads 1 ${CONV:+--conv "$CONV"} >work.log 2>&1 &
(cd "$root/tests/browser" && node dashboard.mjs --base "http://127.0.0.1:$port" \
  --backend cpu --choice cpu --workers 1 --min-syncs 12 --out "$dir" ${WASM:+--wasm "$WASM"}) | grep -E 'browser worker|ratio|FAILED'
