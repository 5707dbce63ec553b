#!/usr/bin/env bash
# The reliability suite at full size (issue #10): a real `tether serve` fuzzed with
# 10⁶ frames, cycled 1 000 times, starved by slow readers and half-open requests,
# killed with SIGKILL 100 times mid-checkpoint, hit by concurrent checkpoint
# triggers, and poisoned. Prints the table (RELIABILITY.md keeps the last one);
# CI runs the same test at a short size. Takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
TETHER_RELIABILITY=full cargo test --release --workspace --test integration \
  -- reliability::reliability_suite --exact --nocapture "$@"
