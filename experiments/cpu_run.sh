#!/usr/bin/env bash
# The laptop run of the README, for one seed: nanoGPT's documented CPU recipe and this repository's quick
# start (config/train_shakespeare_char_cpu.py), one after the other on the same machine (wall time of the
# whole command, best val loss). experiments/time_to_quality.py does the same over 3 seeds.
#   bash experiments/cpu_run.sh [out_root]
set -euo pipefail
cd "$(dirname "$0")/.."
python experiments/time_to_quality.py "${1:-out-cpu-run}" --seeds=1337
