#!/usr/bin/env bash
# Makes the container image's root filesystem in dist/image/rootfs from the release
# tarball's directory (scripts/dist.sh) and the few base-system files it needs, taken
# from this Debian machine: no base image is pulled (no container registry is reachable
# here; the Containerfile starts FROM scratch).
#
#   /opt/nnserve/               the unpacked release (bin/, lib/, share/)
#   /lib, /lib64, /usr/lib      glibc, libstdc++, libgcc_s and the resolver's NSS modules,
#                               exactly the files ldd names for every shipped ELF file
#   /etc                        passwd and group with the user nnserve (65532), hosts
#                               lookup (nsswitch.conf), CA certificates for https stores
#   /models                     where the repository is mounted (or use s3://)
#   /home/nnserve, /tmp         writable: the object-store cache and scratch
#
# Usage: scripts/rootfs.sh   (make image runs it after make dist)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(cargo pkgid -p nnserve | sed "s/.*[@#]//")
release="dist/nnserve-${version}-linux-x86_64"
[ -x "$release/bin/nnserve" ] || { echo "no $release: run make dist first"; exit 1; }
root=dist/image/rootfs
rm -rf dist/image
mkdir -p "$root"/{opt,etc,models,tmp,proc,dev,sys,home/nnserve,etc/ssl/certs}
chmod 1777 "$root/tmp"
cp -a "$release" "$root/opt/nnserve"

copy() {  # a base-system file at the same path (symlinks resolved to the file)
  local path=$1
  [ -e "$root$path" ] && return
  mkdir -p "$root$(dirname "$path")"
  cp -L "$path" "$root$path"
}
for elf in "$root/opt/nnserve/bin/nnserve" $(find "$root/opt/nnserve/lib" -name '*.so*' -type f); do
  ldd "$elf" | while read -r soname arrow path _; do
    case "$soname" in /*) copy "$soname"; continue;; esac   # the loader itself
    [ "$arrow" = "=>" ] || continue
    case "$path" in /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) copy "$path";; esac
  done
done
# Name lookups for an S3 endpoint by host name: glibc's NSS modules and their config.
multiarch=/lib/x86_64-linux-gnu
for lib in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
  [ -e "$multiarch/$lib" ] && copy "$multiarch/$lib"
done
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$root/etc/hosts"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nnnserve:x:65532:65532:nnserve:/home/nnserve:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnnserve:x:65532:\n' > "$root/etc/group"
chown -R 65532:65532 "$root/home/nnserve"
cp Containerfile dist/image/Containerfile
du -sh "$root" | awk '{print "== image root filesystem: " $1}'
