#!/usr/bin/env bash
# tether on a lent GPU (issue #26; ../shared/GPU.md): pack here, run there, one table.
#
#   scripts/gpu-check.sh pack            # here: both binaries, the Vulkan loader, the peer
#   scripts/gpu-check.sh run plain       # there: wgpu bench at batch 128 and 512, PyTorch
#                                        # CUDA beside it, a short served run, a table
#   scripts/gpu-check.sh run fusion      # there: the same bench with Burn's fusion+autotune
#   scripts/gpu-check.sh table DIR...    # here: one table from the runs' reports
#   QUICK=1 scripts/gpu-check.sh run plain   # here, on lavapipe: few steps, tiny batches
#
# The tree that travels to the GPU machine is capped at 64 MiB and the repository is
# ~41 MiB (the shipped Fashion-MNIST is 30 MB of it), so one xz'd binary (~24 MB) fits
# and two do not: each flavour travels in its own call, with the device tool's
#   carry: [".gl", ".gpu/common", ".gpu/plain"]   command: scripts/gpu-check.sh run plain
#   carry: [".gl", ".gpu/common", ".gpu/fusion"]  command: scripts/gpu-check.sh run fusion
# the second right after the first, while the machine is warm. Each prints its table
# and writes its reports to $OUT; `table` joins the two.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cap=$((64 * 1024 * 1024))

# Bytes of the tree that travels (tracked and unignored files) plus the named paths.
travelling() {
  local tree extra=0
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  for p in "$@"; do extra=$((extra + $(du -sb "$p" | cut -f1))); done
  echo $((tree + extra))
}

pack() {
  local target="${CARGO_TARGET_DIR:-$root/target}"
  local fused="${FUSION_TARGET_DIR:-$target/fusion}"
  local peer="${PEER_DIR:-$root/../shared/peer}"
  cargo build --release
  CARGO_TARGET_DIR="$fused" cargo build --release --features fusion
  rm -rf .gpu && mkdir -p .gpu/common .gpu/plain .gpu/fusion
  xz -T0 --x86 --lzma2=preset=9 -c "$target/release/tether" >.gpu/plain/tether.xz
  xz -T0 --x86 --lzma2=preset=9 -c "$fused/release/tether" >.gpu/fusion/tether.xz
  cp "$peer/gpu_bench.py" .gpu/common/
  if ! ls .gl/*.deb >/dev/null 2>&1; then
    # The GPU machine has the NVIDIA driver and its Vulkan ICD but no loader.
    mkdir -p .gl /tmp/amd64/partial
    local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086 # $o is a list of options
    apt-get $o update -qq
    # shellcheck disable=SC2086
    (cd .gl && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  fi
  local failed=0
  for flavour in plain fusion; do
    local bytes
    bytes=$(travelling .gl .gpu/common ".gpu/$flavour")
    printf '%-7s travels %6.1f MiB of %d MiB: ' "$flavour" "$(awk -v b="$bytes" 'BEGIN { print b / 1048576 }')" 64
    (cd .gpu && find common "$flavour" -type f -printf '%p (%s B) ') && ls .gl | tr '\n' ' ' && echo
    if [ "$bytes" -ge "$cap" ]; then
      echo "  over the cap" >&2
      failed=1
    fi
  done
  return $failed
}

run() {
  local flavour="$1" out="${OUT:-$root/.gpu/out}"
  local bin="/tmp/tether-gpu-$flavour" batches="128 512" steps=20 warmup=5 torch_steps=200
  local models="--model small --model paper"
  if [ -n "${QUICK:-}" ]; then
    # lavapipe: autotuning the paper net's kernels alone takes minutes there.
    batches="16 32" steps=2 warmup=1 torch_steps=3 models="--model small"
  fi
  mkdir -p "$out"
  if ls .gl/*.deb >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  local nvidia=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$nvidia" ] && export VK_DRIVER_FILES="$nvidia"
  xz -dc ".gpu/$flavour/tether.xz" >"$bin" 2>/dev/null ||
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      ".gpu/$flavour/tether.xz" "$bin"
  chmod +x "$bin"
  local data="$root/data/fashion-mnist"
  for b in $batches; do
    # shellcheck disable=SC2086 # $models is a list of flags
    timeout 150 "$bin" bench train --backend wgpu $models --batch "$b" \
      --steps "$steps" --warmup "$warmup" --repeats 3 --no-peer --data "$data" \
      --report "$out/train-$flavour-$b.json" >"$out/train-$flavour-$b.log" 2>&1 ||
      echo "bench train at batch $b failed or timed out: $(tail -1 "$out/train-$flavour-$b.log")"
  done
  if [ "$flavour" = plain ]; then
    # shellcheck disable=SC2086 # $batches is a list
    timeout 120 "${PYTHON:-python3}" .gpu/common/gpu_bench.py --batches $batches --steps "$torch_steps" \
      >"$out/torch.jsonl" 2>"$out/torch.log" || echo "PyTorch peer failed: $(tail -1 "$out/torch.log")"
    served "$bin" "$out" "${batches##* }"
  fi
  table "$out"
}

# A short served run: a real server on loopback and one wgpu worker.
served() {
  local bin="$1" out="$2" batch="$3" dir port=18131 steps=200
  [ -n "${QUICK:-}" ] && steps=8
  dir=$(mktemp -d)
  "$bin" serve --port "$port" --batch "$batch" --screen-batch 0 --eval-every 0 \
    --data "$root/data/fashion-mnist" --run-dir "$dir" >"$out/serve.log" 2>&1 &
  local server=$!
  sleep 3
  timeout 120 "$bin" work --server "ws://127.0.0.1:$port" --backend wgpu --steps "$steps" \
    --report "$out/work.json" >"$out/work.log" 2>&1 || echo "served run failed: $(tail -1 "$out/work.log")"
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$dir"
}

table() {
  python3 - "$@" <<'EOF'
import glob, json, os, sys
tether, torch, device, work = {}, {}, {}, None
for d in sys.argv[1:]:
    for f in sorted(glob.glob(os.path.join(d, "train-*.json"))):
        flavour = os.path.basename(f).split("-")[1]
        r = json.load(open(f))
        device[flavour] = r.get("device", "?")
        for row in r["results"]:
            tether[(row["model"], row["batch"], flavour)] = row["samples_per_s"]
    t = os.path.join(d, "torch.jsonl")
    if os.path.exists(t):
        for line in open(t):
            row = json.loads(line)
            if "model" in row:
                torch[(row["model"], row["batch"], row["bf16"])] = row["samples_per_s"]
            else:
                device["torch"] = f'{row.get("device")} (torch {row.get("torch")})'
    w = os.path.join(d, "work.json")
    if os.path.exists(w):
        work = json.load(open(w))
for k, v in sorted(device.items()):
    print(f"{k}: {v}")
print(f'{"model":>6} {"batch":>6} {"wgpu s/s":>10} {"fused s/s":>10} {"torch fp32":>11} {"torch bf16":>11} {"best/fp32":>10}')
for model, batch in sorted({(m, b) for m, b, _ in tether}):
    plain, fused = tether.get((model, batch, "plain")), tether.get((model, batch, "fusion"))
    fp32, bf16 = torch.get((model, batch, False)), torch.get((model, batch, True))
    best = max(x for x in (plain, fused, 0) if x is not None)
    cell = lambda x: f"{x:.0f}" if x else "-"
    ratio = f"{best / fp32:.2f}x" if fp32 and best else "-"
    print(f"{model:>6} {batch:>6} {cell(plain):>10} {cell(fused):>10} {cell(fp32):>11} {cell(bf16):>11} {ratio:>10}")
if work:
    print(f'served run, one wgpu worker: {work["steps"]} steps, {work["syncs"]} syncs, '
          f'{work["samples_per_s"]:.0f} samples/s, training {100 * work["compute_utilisation"]:.0f} % of wall time')
EOF
}

case "${1:-}" in
  pack) pack ;;
  run) run "${2:?plain or fusion}" ;;
  table) shift; table "$@" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
