#!/usr/bin/env bash
# The wheels a GPU node of this workplace lacks (its image has torch, torchvision, timm,
# transformers, lightning, pyarrow, pytest-xdist, ...; not hydra, omegaconf, wandb, optuna,
# open_clip, nltk, umap), downloaded here for its Python 3.12 into .whl/ (git-ignored there:
# `echo /.whl/ >> .git/info/exclude`). About 34 MB. On the node:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/gpu_check.py --tests 15
# The versions are the ones gpu_check ran with on 2026-12-04; antlr4 4.9.3 has no wheel on
# PyPI, so it is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
download alembic==1.20.1 annotated_types==0.8.0 colorlog==6.12.0 cwevals==0.0.1b1 \
  defusedxml==0.7.1 distro==1.9.0 ftfy==6.3.1 googleapis_common_protos==1.76.0 \
  hydra_core==1.3.8 hydra_submitit_launcher==1.2.0 mako==1.4.3 nltk==3.10.4 omegaconf==2.3.1 \
  open_clip_torch==3.3.0 opentelemetry_api==1.45.2 \
  opentelemetry_exporter_http_transport==0.66b2 opentelemetry_exporter_otlp_common==0.66b2 \
  opentelemetry_exporter_otlp_proto_common==1.45.2 \
  opentelemetry_exporter_otlp_proto_http==1.45.2 opentelemetry_proto==1.45.2 \
  opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2 optuna==5.1.0 \
  platformdirs==4.14.9 pydantic==2.14.4 pydantic_core==2.50.5 pynndescent==0.7.0 \
  sniffio==1.3.1 sqlalchemy==2.1.9 submitit==1.5.4 typing_extensions==4.16.0 \
  typing_inspection==0.4.5 umap_learn==0.5.12 wandb==0.31.0 wcwidth==0.9.4
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$dest"
ls "$dest" | wc -l
