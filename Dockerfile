# The training image: CUDA PyTorch with this package, its configs and launchers, run as a
# non-root user. Mount the data at /data and a folder for the runs at /runs.
#
#   docker build -t jocor-ddp:0.1.0 .
#   docker run --rm jocor-ddp:0.1.0        # prints python -m jocor_ddp.train --help
#   docker run --rm --gpus all --ipc=host -v DATA:/data -v RUNS:/runs jocor-ddp:0.1.0 \
#       launch/local.sh configs/cifar10_sym50.yaml
#
# torch, torchvision and numpy come with the base image (pick a tag whose CUDA your driver
# supports: --build-arg BASE_IMAGE=...); the other dependencies are pinned below.
# tests/test_docker.py builds this file on a local stand-in base and trains, stops and resumes
# in containers (`docker stop` ends a run with a checkpoint and exit status 143).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

RUN pip install webdataset==1.0.2 pyyaml==6.0.4 pillow==13.0.0 \
    && python -c "import numpy, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

WORKDIR /opt/jocor_ddp
COPY pyproject.toml README.md ./
COPY jocor_ddp/ jocor_ddp/
RUN pip install --no-deps . \
    && python -m jocor_ddp.train --help > /dev/null
COPY configs/ configs/
COPY launch/ launch/

# The job writes only under /runs (RUNS: the launchers' run root); /data is read.
# A numeric USER lets Kubernetes verify runAsNonRoot; uid 1000 is created unless the base
# image has it already (Ubuntu 24.04 bases do: 'ubuntu').
RUN (id -u 1000 > /dev/null 2>&1 || useradd --create-home --uid 1000 --user-group jocor) \
    && mkdir -p /data /runs \
    && chown 1000:1000 /runs
USER 1000:1000
ENV RUNS=/runs

CMD ["python", "-m", "jocor_ddp.train", "--help"]
