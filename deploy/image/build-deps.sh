#!/usr/bin/env bash
# The builder stage's system packages: a C++ compiler for hnswlib (a source-only package).
# Installs with apt-get only when the compiler is missing (the slim base image); where one is
# already there (a developer machine, tests/test_deploy_image.py) it changes nothing.
set -euo pipefail

if command -v "${CXX:-g++}" >/dev/null 2>&1; then
    echo "build-deps.sh: $(command -v "${CXX:-g++}") is there"
    exit 0
fi
apt-get update
apt-get install --yes --no-install-recommends g++
rm -rf /var/lib/apt/lists/*
