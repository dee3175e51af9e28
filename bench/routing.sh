#!/usr/bin/env bash
# What an endpoint's router adds per request: the same mlp model called by name and
# through the `mlp-ab` endpoint (weighted-router, one Wasm instance per call), one
# keep-alive client on loopback, side by side in one run. Prints p50/p99 of each and the
# difference; nothing is asserted.
# Usage: bench/routing.sh [N]   (from the repository root; `make setup` first)
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
N=${1:-20000}
cargo build --release -q -p nnserve -p nnserve-bench
BENCH=target/release/nnserve-bench
tmp=$(mktemp -d)
target/release/nnserve serve -r examples/repository -l 127.0.0.1:0 --log warn > "$tmp/out" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
until grep -q listening "$tmp/out"; do sleep 0.01; done
url=$(grep -o 'listening on http://[0-9.:]*' "$tmp/out" | cut -d' ' -f3)
echo '{"instances": [[1.0, 2.0, 3.0, 4.0]]}' > "$tmp/row.json"
echo "== machine: $(nproc) cores; $N requests per line, alternating rounds"
for round in 1 2; do
  echo "-- round $round: mlp-a by name, then through the mlp-ab endpoint"
  $BENCH http "$url" /v1/models/mlp-a:predict "$tmp/row.json" "$N"
  $BENCH http "$url" /v1/models/mlp-ab:predict "$tmp/row.json" "$N"
done
echo "== router calls as the server timed them (instantiate + route)"
curl -s "$url/metrics" | grep -E '^nnserve_router_duration_seconds_(sum|count)'
