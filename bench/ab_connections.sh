#!/bin/bash
# A/B of two server binaries on mlp :predict under wrk, alternating, three rounds:
#   bench/ab_connections.sh OLD_BINARY [NEW_BINARY]
# (session 8: the connection layer against the axum::serve build of 6ee5148).
set -u
cd "$(dirname "$0")/.."
old=${1:?usage: bench/ab_connections.sh OLD_BINARY [NEW_BINARY]}
new=${2:-target/release/nnserve}
mkdir -p /tmp/ab
echo '{"instances": [[1.0, 2.0, 3.0, 4.0]]}' > /tmp/ab/body.json
repo=/tmp/ab/repo; rm -rf $repo; mkdir -p $repo; cp -r examples/repository/mlp $repo/
for round in 1 2 3; do
  for bin in "$old" "$new"; do
    $bin serve -r $repo -l 127.0.0.1:0 > /tmp/ab/out 2>/tmp/ab/err &
    pid=$!
    for i in $(seq 100); do grep -q listening /tmp/ab/out && break; sleep 0.1; done
    url=$(grep -o 'listening on http://[^ "]*' /tmp/ab/out | cut -d' ' -f3)
    for c in 1 64; do
      r=$(BODY_FILE=/tmp/ab/body.json wrk -t1 -c$c -d5s --latency -s bench/post.lua $url/v1/models/mlp:predict | grep RESULT)
      set -- $r
      echo "round $round $bin c=$c req/s=$(( $2 * 1000000 / $3 )) p50us=$5 p99us=$7 errors=$4"
    done
    kill $pid; wait $pid 2>/dev/null
  done
done
