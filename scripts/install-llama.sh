#!/usr/bin/env bash
# Install a *portable* llama-cpp-python into the active Python (the embedded model's runtime).
#
# Why: the PyPI package is an sdist that compiles llama.cpp with -march=native by default. A wheel
# built that way on one CPU dies with SIGILL on another (seen: ggml's AMX kernels inside a VM that
# advertises AMX), and pip's wheel cache hands such a build back on the next install. So we
#   - build with GGML_NATIVE=OFF and an explicit baseline (x86-64: AVX2/FMA/F16C/BMI2, no AVX-512/AMX;
#     arm64: the compiler's armv8-a default),
#   - never take it from pip's cache (--no-cache-dir --no-binary), and keep our own wheel cache keyed
#     by version + architecture + flags, so a second install on the same machine takes seconds,
#   - prove it generates tokens in a child process before saying it is installed.
# Idempotent: does nothing when the active environment already has this exact portable build.
set -euo pipefail
VERSION=0.3.36
arch=$(uname -m)
case "$arch" in
  x86_64 | amd64)
    flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    flags="$flags -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *) flags="-DGGML_NATIVE=OFF" ;;
esac
# the multimodal (llava/mtmd) library is loaded lazily and unused here: not building it saves minutes
flags="$flags -DLLAVA_BUILD=OFF"
key=$(printf '%s|%s|%s' "$VERSION" "$arch" "$flags" | sha256sum | cut -c1-16)
py=${PYTHON_BIN:-python}
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
marker="$site/llama_cpp_portable.txt"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ] && "$py" -c 'import llama_cpp' 2>/dev/null; then
  exit 0
fi
cache=${LLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/creativity-server/llama-wheels}/$key
wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION portably for $arch (about 5 minutes on 2 cores)..."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  start=$(date +%s)
  CMAKE_ARGS="$flags" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$py" -m pip wheel --quiet --no-cache-dir --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$VERSION" -w "$tmp"
  echo "built in $(( $(date +%s) - start )) s"
  mkdir -p "$cache"
  built=$(ls "$tmp"/llama_cpp_python-*.whl)
  cp "$built" "$cache/.partial" && mv "$cache/.partial" "$cache/$(basename "$built")"
  wheel="$cache/$(basename "$built")"
fi
"$py" -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$wheel"
# the runtime dependencies of llama-cpp-python itself (numpy, jinja2, ...), never the package again
"$py" -m pip install --quiet "llama-cpp-python[server]==$VERSION"
echo "$key" > "$marker"
