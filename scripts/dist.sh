#!/usr/bin/env bash
# Builds the relocatable release tarball: dist/nnserve-<version>-linux-x86_64.tar.gz
#
#   bin/nnserve                 the release binary, RUNPATH $ORIGIN/../lib
#   lib/*.so*                   every library it needs that the base system lacks
#                               (libtorch's CPU half and its few CUDA runtime stubs),
#                               each with RUNPATH $ORIGIN
#   lib/tensorflow/             the TF C API (libtensorflow.so, libtensorflow_framework.so.2),
#                               opened at run time by the TensorFlow backend
#   share/nnserve/              README, docs, the example repository, LICENSE notes
#
# No CUDA libraries beyond the two libtorch_cpu.so itself needs: libtorch_cuda.so is
# opened at run time when present (backend::torch::cuda_library), so this CPU tarball
# serves on CPU, and docs/install.md lists what a CUDA host adds.
#
# Usage: scripts/dist.sh [BINARY]   (default target/release/nnserve; run `make dist`)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/nnserve}
version=$(cargo pkgid -p nnserve | sed "s/.*[@#]//")
name="nnserve-${version}-linux-x86_64"
out="dist/${name}"
command -v patchelf >/dev/null || { echo "patchelf is missing: make dist installs it (apt-get install patchelf)"; exit 1; }
[ -x "$bin" ] || { echo "no $bin: run make build first"; exit 1; }

echo "== dist: $out"
rm -rf "$out" "dist/${name}.tar.gz"
mkdir -p "$out/bin" "$out/lib/tensorflow" "$out/share/nnserve"
cp "$bin" "$out/bin/nnserve"

# A library is shipped when it does not come from the base system's directories.
system() { case "$1" in /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) return 0;; *) return 1;; esac; }

copy_deps() {  # copies what $1 needs (ldd lists the whole closure) into $out/lib
  ldd "$1" | while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    if [ "$path" = "not" ]; then echo "dist: $1 needs $soname, which is not found"; exit 1; fi
    system "$path" && continue
    [ -e "$out/lib/$soname" ] || [ -e "$out/lib/tensorflow/$soname" ] && continue
    cp -L "$path" "$out/lib/$soname"
  done
}
copy_deps "$bin"

# TensorFlow: the wheel's libtensorflow_cc.so.2 under the name the C API loader opens,
# and its framework library (build.rs made the same pair of links in the build).
tf=$("${PY:-.venv/bin/python}" -c "import importlib.util, os; s = importlib.util.find_spec('tensorflow'); print(os.path.dirname(s.origin) if s and s.origin else '')" 2>/dev/null || true)
if [ -n "$tf" ] && [ -f "$tf/libtensorflow_cc.so.2" ]; then
  cp -L "$tf/libtensorflow_cc.so.2" "$out/lib/tensorflow/libtensorflow.so"
  cp -L "$tf/libtensorflow_framework.so.2" "$out/lib/tensorflow/libtensorflow_framework.so.2"
  copy_deps "$tf/libtensorflow_cc.so.2"
else
  echo "dist: no tensorflow wheel found; the tarball serves TorchScript only" >&2
fi

# RUNPATHs: the binary looks in ../lib, every library beside itself (and TF's in ..).
patchelf --set-rpath '$ORIGIN/../lib' "$out/bin/nnserve"
for lib in "$out"/lib/*.so*; do patchelf --set-rpath '$ORIGIN' "$lib"; done
for lib in "$out"/lib/tensorflow/*; do patchelf --set-rpath '$ORIGIN:$ORIGIN/..' "$lib"; done

# Docs and the example repository (its models are made at setup; copied as built).
cp README.md "$out/share/nnserve/"
cp -r docs "$out/share/nnserve/docs"
mkdir -p "$out/share/nnserve/examples"
cp -r examples/repository "$out/share/nnserve/examples/repository"
rm -rf "$out/share/nnserve/examples/repository/.tmp"

echo "== dist: packing (gzip; about a minute for the TensorFlow libraries)"
tar -C dist -cf - "$name" | gzip -6 > "dist/${name}.tar.gz"
du -sh "$out" | awk '{print "== dist: unpacked " $1}'
ls -l "dist/${name}.tar.gz" | awk -v n="dist/${name}.tar.gz" '{printf "== dist: %s is %.0f MB\n", n, $5 / 1e6}'
