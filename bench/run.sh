#!/usr/bin/env bash
# Builds what the benchmarks need and prints their figures (nothing is asserted).
# Usage: bench/run.sh   (from the repository root; `make setup` first)
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
cargo build --release -q -p nnserve -p nnserve-bench
BENCH=target/release/nnserve-bench
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT

.venv/bin/python examples/draw_digit.py 7 /tmp/nnserve-bench-digit.png >/dev/null
echo "== machine: $(nproc) cores, $(uname -m)"
$BENCH inproc examples/repository

echo "== start-up of the server on examples/repository"
start=$(date +%s%N)
target/release/nnserve serve -r examples/repository -l 127.0.0.1:0 --log warn > "$tmp/out" &
pid=$!
until grep -q listening "$tmp/out"; do sleep 0.01; done
url=$(grep -o 'listening on http://[0-9.:]*' "$tmp/out" | cut -d' ' -f3)
echo "ready after $(( ($(date +%s%N) - start) / 1000000 )) ms; RSS $(($(awk '/VmRSS/{print $2}' /proc/$pid/status) / 1024)) MiB"

echo '{"instances": [[1.0, 2.0, 3.0, 4.0]]}' > "$tmp/mlp.json"
echo "== HTTP on loopback, one client, keep-alive ($url)"
$BENCH http "$url" /v1/models/mlp:predict "$tmp/mlp.json" 20000
$BENCH http "$url" /v1/models/digits:infer /tmp/nnserve-bench-digit.png 5000
echo "RSS after the loops: $(($(awk '/VmRSS/{print $2}' /proc/$pid/status) / 1024)) MiB"
