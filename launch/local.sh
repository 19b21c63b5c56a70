#!/usr/bin/env bash
# One node: one worker per GPU, or NPROC_PER_NODE CPU processes (default 1) when there is
# no GPU. Extra key=value arguments override the config.
#
#   launch/local.sh CONFIG [key=value ...]
#   NPROC_PER_NODE=2 launch/local.sh configs/fashion_mnist_sym50.yaml train.epochs=5
#
# The run folder is RUNS/RUN_NAME (default runs/<config file name>): running the same
# command again continues from its newest checkpoint (train.resume=auto). The other
# variables are those of launch/multinode.sh.
set -euo pipefail
if (($# < 1)); then echo "usage: launch/local.sh CONFIG [key=value ...]" >&2; exit 2; fi
unset RDZV_ENDPOINT PET_NNODES PET_RDZV_ENDPOINT
export NNODES=1
exec "$(dirname "${BASH_SOURCE[0]}")/multinode.sh" "$@"
