#!/usr/bin/env bash
# Build llama.cpp's own llama-server, the peer we are measured against, from the llama.cpp
# source that the installed llama-cpp-python sdist vendors, so both run the same llama.cpp.
# Output: bench/work/llama-server. Takes a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p work
version=$(../.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
if [[ ! -d work/llama-cpp-python-$version ]]; then
  ../.venv/bin/python -m pip download --no-deps --no-binary :all: -d work "llama-cpp-python==$version"
  tar -xzf "work/llama_cpp_python-$version.tar.gz" -C work
  mv "work/llama_cpp_python-$version" "work/llama-cpp-python-$version"
fi
src="work/llama-cpp-python-$version/vendor/llama.cpp"
cmake -S "$src" -B work/llama-build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build work/llama-build --target llama-server -j "$(nproc)"
cp work/llama-build/bin/llama-server work/llama-server
echo "built bench/work/llama-server (llama.cpp vendored by llama-cpp-python $version)"
