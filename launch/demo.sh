#!/usr/bin/env bash
# The demo: set up (venv, package, Fashion-MNIST), then train JoCoR for a few epochs on
# 2 CPU processes (or every GPU) with 50% symmetric label noise, and print the result.
# Extra key=value arguments are passed to the trainer (e.g. train.epochs=20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "demo: Fashion-MNIST is missing: install Debian's dataset-fashion-mnist, or pass data.root=DIR" >&2
  echo "demo: (a folder with train-images-idx3-ubyte.gz and the three other IDX files)" >&2
fi
nproc_per_node=2
if .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  nproc_per_node=$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count())')
fi
run_dir=runs/demo
rm -rf "$run_dir"  # the demo always starts fresh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/torchrun --nproc_per_node="$nproc_per_node" -m jocor_ddp.train \
  --config configs/fashion_mnist_sym50.yaml run.dir="$run_dir" train.epochs=10 train.resume=never "$@"
.venv/bin/python - "$run_dir" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
last = rows[-1]
print(f"\ndemo result after {last['epoch']} epochs (50% of training labels wrong):")
print(f"  test accuracy     net1 {last['test_acc1']:.2f}%   net2 {last['test_acc2']:.2f}%")
print(f"  label precision   {100 * last['label_precision']:.2f}% of the samples JoCoR kept had the right label"
      f" (50% would be no better than chance)")
print(f"  metrics: {sys.argv[1]}/metrics.jsonl   checkpoints: {sys.argv[1]}/checkpoints/")
PY
