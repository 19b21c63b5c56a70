#!/usr/bin/env bash
# Train on one node or many: torchrun with c10d rendezvous, driven by the environment
# variables that a scheduler (Slurm, a Kubeflow PyTorchJob) or a shell on each node sets.
# Run the same command on every node; torchrun numbers the nodes as they join the
# rendezvous, so no node rank is needed, and restarts the workers of every node (up to
# MAX_RESTARTS times) when one fails or a replacement node joins.
#
#   launch/multinode.sh CONFIG [key=value ...]
#
# NNODES          nodes, or MIN:MAX for an elastic job     (else PET_NNODES; default 1)
# NPROC_PER_NODE  workers per node                         (else PET_NPROC_PER_NODE; default:
#                 the GPUs this node sees, or 1 without GPUs)
# RDZV_ENDPOINT   HOST:PORT of the rendezvous on one of the nodes, the same on all (else
#                 PET_RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT); needed when NNODES is not 1
# RDZV_ID         the job's id, the same on all nodes      (else PET_RDZV_ID; default RUN_NAME)
# RDZV_CONF       extra rendezvous settings, e.g. join_timeout=1800
# MAX_RESTARTS    worker-group restarts before giving up   (else PET_MAX_RESTARTS; default 3)
# RUNS, RUN_NAME  the run folder is RUNS/RUN_NAME (default runs/<config file name>). Keep it
#                 the same across restarts and requeues: train.resume=auto continues from the
#                 newest checkpoint in it. A run.dir=... override still wins.
# PYTHON          the interpreter that counts the GPUs (default python)
# DRY_RUN=1       print the torchrun command instead of running it
# PET_* are the variables the Kubeflow training operator sets; the plain names win.
set -euo pipefail

usage="usage: launch/multinode.sh CONFIG [key=value ...]"
if (($# < 1)); then echo "$usage" >&2; exit 2; fi
config=$1
shift
if [[ ! -f $config ]]; then echo "multinode.sh: config $config not found; $usage" >&2; exit 2; fi

nnodes=${NNODES:-${PET_NNODES:-1}}
nproc=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}
if [[ -z $nproc ]]; then
  gpus=$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count())')
  nproc=$((gpus > 0 ? gpus : 1))
fi
run_name=${RUN_NAME:-$(basename "$config" .yaml)}
run_dir=${RUNS:-runs}/$run_name

args=(--nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}")
if [[ $nnodes == 1 ]]; then
  # One node: a private rendezvous on a free local port.
  args+=(--standalone)
else
  endpoint=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
  if [[ -z $endpoint && -n ${MASTER_ADDR:-} ]]; then endpoint=$MASTER_ADDR:${MASTER_PORT:-29400}; fi
  if [[ -z $endpoint ]]; then
    echo "multinode.sh: NNODES=$nnodes needs RDZV_ENDPOINT=HOST:PORT, a host of the job that every node reaches" >&2
    exit 2
  fi
  args+=(--rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${RDZV_ID:-${PET_RDZV_ID:-$run_name}}")
  if [[ -n ${RDZV_CONF:-} ]]; then args+=(--rdzv-conf="$RDZV_CONF"); fi
fi

cmd=(torchrun "${args[@]}" -m jocor_ddp.train --config "$config" run.dir="$run_dir" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "multinode.sh: run folder $run_dir (train.resume=auto continues from its checkpoints)" >&2
# torchrun runs as a child rather than exec'd, for the status of a stopped job. On SIGTERM
# (docker stop, a Kubernetes eviction, Slurm's preemption) torchrun stops its workers, which
# write a checkpoint, and then exits 1 with a traceback, as after a failure; this script
# forwards the signal and exits 143 (128 + SIGTERM) instead, so that a stopped job does not
# read as a failed one: Kubeflow's restartPolicy ExitCode retries 128-255 but gives up on 1-127.
# SIGINT is not forwarded: Ctrl-C reaches torchrun and the workers from the terminal itself.
"${cmd[@]}" &
torchrun_pid=$!
signal=0
trap 'signal=15; kill -TERM "$torchrun_pid" 2> /dev/null || true' TERM
trap 'signal=2' INT
# A trapped signal ends `wait` early: wait again until torchrun has exited.
while true; do
  status=0
  wait "$torchrun_pid" || status=$?
  kill -0 "$torchrun_pid" 2> /dev/null || break
done
if ((signal && status != 0)); then
  echo "multinode.sh: stopped by signal $signal; rerun the same command to continue from the checkpoint" >&2
  status=$((128 + signal))
fi
exit "$status"
