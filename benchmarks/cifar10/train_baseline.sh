#!/usr/bin/env bash
# Dense CIFAR-10 baseline of the protocol (see README.md). Usage:
#   benchmarks/cifar10/train_baseline.sh PATH/TO/cifar10.zip OUTPUT_DIR [extra mambatrim train options]
set -euo pipefail
DATA=${1:?the CIFAR-10 zip (train/ and test/ class folders)}
OUT=${2:?output folder}
shift 2
mambatrim train --config configs/cifar10_vim_tiny_p2.yaml --data-path "$DATA" --output-dir "$OUT" --no-progress "$@"
