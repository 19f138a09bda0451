#!/bin/bash
# Build (once) and cache the tiny test guest of the end-to-end test
# (tests/e2e/run-guests.py, docs/e2e.rst): Debian's kernel plus a busybox
# initramfs that holds the virtio modules, contrib/guest/init and the static
# workload contrib/guest/extlock-stress.
#
#   contrib/guest/build-guest.sh [--force] [--refresh] [--quiet]
#
# Everything comes from Debian packages fetched with "apt-get download" and
# unpacked with "dpkg-deb -x" into the cache: nothing is installed on the
# host.  linux-image-amd64 is resolved to the concrete kernel package it
# depends on; its vmlinuz and the modules virtio_pci and virtio_blk need
# (with their dependencies, from a modules.dep made by busybox's depmod)
# go into the guest.  busybox-static provides the guest's userland and,
# on the host, depmod and cpio.  extlock-stress.c is compiled with
# "gcc -static".
#
# For the persistent-reservation test (tests/e2e/run-pr-guests.py,
# docs/guest-clusters.rst) the guest also gets the modules virtio_scsi,
# sd_mod and sg (scsi_mod comes in as their dependency) and sg_persist,
# sg_raw, sg_turs and sg_inq from Debian's sg3-utils and libsgutils2
# (dynamically linked: the dynamic loader and libc are copied from the
# host, a Debian 12 like the guest's packages; see add_sg3_utils below).
#
# Cache: ${EXTLOCK_CACHE:-$HOME/.cache/extlock}/guest/
#   debs/                    the downloaded packages
#   vmlinuz, initrd.img      the guest
#   guest.env                KERNEL=, INITRD=, KERNEL_VERSION=, ... (sourceable)
# The packages are fetched only when the cache has none (or with --refresh,
# which asks apt for the current versions).  The initramfs is rebuilt when
# init, extlock-stress.c or this script change (their hash is recorded), or
# with --force.  A lock file serialises concurrent runs.
#
# Prints the paths of the kernel and the initramfs as "KERNEL=..." and
# "INITRD=..." lines on stdout (progress goes to stderr).
#
# Needs: apt-get (only for the first build), dpkg-deb, gcc with static glibc
# (libc6-dev), gzip, flock, sha256sum.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${EXTLOCK_CACHE:-$HOME/.cache/extlock}/guest
FORCE=0
REFRESH=0
QUIET=0
# modules the guest needs to see its virtio-blk disk (their dependencies
# are added from modules.dep), and the ACPI power button as an input
# device for init's xl.acpi=1
MODULES=(virtio_pci virtio_blk button evdev)
# the virtio-scsi disk of the persistent-reservation test, and the SCSI
# generic driver sg_persist/sg_raw use (init's xl.serve=1)
MODULES+=(virtio_scsi sd_mod sg)

usage() {
    sed -n '2,/^# SPDX/p' "$0" | grep -v SPDX | sed 's/^# \{0,1\}//'
    exit "$1"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --force) FORCE=1 ;;
    --refresh) REFRESH=1; FORCE=1 ;;
    --quiet) QUIET=1 ;;
    -h|--help) usage 0 ;;
    *) echo "build-guest: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done

log() {
    if [ "$QUIET" = 0 ]; then
        echo "build-guest: $*" >&2
    fi
}

die() {
    echo "build-guest: error: $*" >&2
    exit 1
}

for tool in dpkg-deb gcc gzip flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/install-deps.sh)"
done

mkdir -p "$CACHE/debs"
exec 9>"$CACHE/.lock"
flock 9

# --- packages -------------------------------------------------------------

# Newest cached .deb of a package, or nothing.
cached_deb() {
    local f
    f=$(ls -1 "$CACHE/debs/$1"_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
    echo "$f"
}

# Download a package into the cache (apt-get download runs unprivileged as
# _apt when it can, so it gets a directory of its own it may write to, in
# /tmp: $HOME may be closed to _apt).
download() {
    local pkg=$1 tmp
    command -v apt-get >/dev/null || die "apt-get not found: cannot fetch $pkg"
    log "downloading $pkg"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/extlock-guest-dl.XXXXXX")
    chmod 0777 "$tmp"
    if ! (cd "$tmp" && apt-get download -q "$pkg" >&2); then
        # a fresh machine may have no package lists yet: update once
        log "apt-get download $pkg failed; running apt-get update"
        if ! apt-get update -q >&2 ||
           ! (cd "$tmp" && apt-get download -q "$pkg" >&2); then
            rm -rf "$tmp"
            die "apt-get download $pkg failed"
        fi
    fi
    mv "$tmp"/*.deb "$CACHE/debs/"
    rm -rf "$tmp"
}

# The cached .deb of a package, downloading it if needed.
get_deb() {
    local pkg=$1 f
    f=$(cached_deb "$pkg")
    if [ -z "$f" ] || [ "$REFRESH" = 1 ]; then
        if [ "$REFRESH" = 1 ]; then
            rm -f "$CACHE/debs/$pkg"_*.deb
        fi
        download "$pkg"
        f=$(cached_deb "$pkg")
        [ -n "$f" ] || die "no .deb of $pkg after download"
    fi
    echo "$f"
}

# linux-image-amd64 is a metapackage: its first dependency is the real
# kernel package, linux-image-<abi>-amd64.
meta=$(get_deb linux-image-amd64)
kpkg=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' |
       sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n 1)
[ -n "$kpkg" ] || die "cannot find the kernel package in $meta's Depends"
kdeb=$(get_deb "$kpkg")
bdeb=$(get_deb busybox-static)

kver_pkg=$(dpkg-deb -f "$kdeb" Version)
bver_pkg=$(dpkg-deb -f "$bdeb" Version)
# sg3-utils for the persistent-reservation test; its library package is
# named after the soname (libsgutils2-1.46-2 in bookworm): the one
# sg3-utils depends on
sgdeb=$(get_deb sg3-utils)
sglibpkg=$(dpkg-deb -f "$sgdeb" Depends | tr ',' '\n' |
           sed -n 's/^ *\(libsgutils2-[^ ]*\).*/\1/p' | head -n 1)
[ -n "$sglibpkg" ] || die "cannot find libsgutils2 in $sgdeb's Depends"
sglibdeb=$(get_deb "$sglibpkg")
sgver_pkg=$(dpkg-deb -f "$sgdeb" Version)

# --- cache check ----------------------------------------------------------

inputs_hash=$(cat "$HERE/init" "$HERE/extlock-stress.c" "$0" |
              sha256sum | cut -d' ' -f1)
stamp="kernel=$kpkg/$kver_pkg busybox=$bver_pkg inputs=$inputs_hash"
# sg3-utils and the host's loader and libc that run it in the guest
libc_hash=$(cat /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libc.so.6 |
            sha256sum | cut -c1-16)
stamp="$stamp sg3-utils=$sgver_pkg/$sglibpkg libc=$libc_hash"

# the guest agent is the host's (Debian's qemu-guest-agent): its version
QEMU_GA=$(command -v qemu-ga || true)
stamp="$stamp qemu-ga=$( { [ -z "$QEMU_GA" ] || sha256sum <"$QEMU_GA"; } | cut -c1-16)"
if [ "$FORCE" = 0 ] && [ -f "$CACHE/guest.env" ] && [ -f "$CACHE/initrd.img" ] &&
   [ -f "$CACHE/vmlinuz" ] && grep -qxF "STAMP='$stamp'" "$CACHE/guest.env"; then
    log "cached guest is up to date ($kpkg $kver_pkg)"
    echo "KERNEL=$CACHE/vmlinuz"
    echo "INITRD=$CACHE/initrd.img"
    exit 0
fi

# --- unpack (into a temporary directory: the kernel's modules take 400 MB
# unpacked and the guest needs half a dozen of them) -----------------------

WORK=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
KDIR=$WORK/kernel
BDIR=$WORK/busybox
log "unpacking $(basename "$kdeb")"
dpkg-deb -x "$kdeb" "$KDIR"
dpkg-deb -x "$bdeb" "$BDIR"

BUSYBOX=$BDIR/bin/busybox
[ -x "$BUSYBOX" ] || die "no busybox in $bdeb"
vmlinuz=$(ls -1 "$KDIR"/boot/vmlinuz-* | head -n 1)
[ -f "$vmlinuz" ] || die "no vmlinuz in $kdeb"
KVER=${vmlinuz##*/vmlinuz-}
MODDIR=$KDIR/lib/modules/$KVER
[ -d "$MODDIR" ] || die "no modules for $KVER in $kdeb"

# The package ships no modules.dep (depmod runs at installation); make one
# with busybox's depmod on the unpacked tree.
log "generating modules.dep for $KVER"
"$BUSYBOX" depmod -b "$KDIR" "$KVER"

# --- initramfs ------------------------------------------------------------

# sg3-utils' tools for the persistent-reservation test: unpacked from the
# two packages, with the libraries they need (ld.so --list on the host,
# which is Debian 12 as they are) copied to the same paths in the guest.
# sg_turs, sg_persist and sg_raw are what fence_scsi runs; sg_inq helps
# when debugging by hand (xl.shell=1).
add_sg3_utils() {
    local root=$1 sgdir=$WORK/sg3 tool lib libs=()
    dpkg-deb -x "$sgdeb" "$sgdir"
    dpkg-deb -x "$sglibdeb" "$sgdir"
    mkdir -p "$root/usr/bin" "$root/lib64" "$root/lib/x86_64-linux-gnu"
    for tool in sg_persist sg_raw sg_turs sg_inq; do
        [ -x "$sgdir/usr/bin/$tool" ] || die "no $tool in $sgdeb"
        cp "$sgdir/usr/bin/$tool" "$root/usr/bin/$tool"
        while read -r lib; do
            libs+=("$lib")
        done < <(LD_LIBRARY_PATH=$sgdir/usr/lib/x86_64-linux-gnu \
                 /lib64/ld-linux-x86-64.so.2 --list "$sgdir/usr/bin/$tool" |
                 sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p')
    done
    for lib in "${libs[@]}"; do
        # the library under its soname, at the path the loader searches
        cp -L "$lib" "$root/lib/x86_64-linux-gnu/${lib##*/}"
    done
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
    log "  sg3-utils $sgver_pkg: $(cd "$root/lib/x86_64-linux-gnu" && echo *)"
}

log "building the initramfs ($KVER, busybox $bver_pkg)"
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules/"$KVER"}

# The module closure: each wanted module and everything modules.dep says it
# needs (a module built into the kernel has no line and needs nothing).
declare -A want=()
resolve() {
    local name=$1 line path dep
    line=$(grep -E "(^|/)${name//_/[_-]}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" || true)
    if [ -z "$line" ]; then
        if grep -qE "(^|/)${name//_/[_-]}\.ko" "$MODDIR/modules.builtin"; then
            log "  $name is built into the kernel"
            return 0
        fi
        die "module $name is neither in modules.dep nor built in"
    fi
    path=${line%%:*}
    [ -n "${want[$path]:-}" ] && return 0
    want[$path]=1
    for dep in ${line#*:}; do
        dep=${dep##*/}
        resolve "${dep%%.ko*}"
    done
}
for m in "${MODULES[@]}"; do
    resolve "$m"
done
# the guest agent's channel (virtio-serial) and the file system it
# freezes (ext4 on a second disk; crc32c is a soft dependency of ext4)
if [ -n "$QEMU_GA" ]; then
    for m in virtio_console ext4 crc32c_generic; do
        resolve "$m"
    done
fi
for path in "${!want[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$path")"
    cp "$MODDIR/$path" "$ROOT/lib/modules/$KVER/$path"
    log "  module $path"
done
cp "$MODDIR/modules.builtin" "$MODDIR/modules.order" "$ROOT/lib/modules/$KVER/"
"$BUSYBOX" depmod -b "$ROOT" "$KVER"

cp "$BUSYBOX" "$ROOT/bin/busybox"
# the applets init uses before it runs "busybox --install" itself
for applet in sh mount mkdir; do
    ln -s busybox "$ROOT/bin/$applet"
done
install -m 0755 "$HERE/init" "$ROOT/init"
echo "$KVER" >"$ROOT/etc/kernel-version"

add_sg3_utils "$ROOT"

log "compiling extlock-stress (static)"
gcc -static -O2 -Wall -Wextra -Werror -pthread -o "$ROOT/bin/extlock-stress" \
    "$HERE/extlock-stress.c"

# The guest agent (init starts it with xl.ga=1): Debian's dynamically
# linked qemu-ga from the host's qemu-guest-agent package, with the
# libraries ldd names and the loader, at the same paths.
if [ -n "$QEMU_GA" ]; then
    log "adding the guest agent $QEMU_GA and its libraries"
    install -D -m 0755 "$QEMU_GA" "$ROOT/bin/qemu-ga"
    for lib in $(ldd "$QEMU_GA" | grep -o '/[^ ]*'); do
        install -D -m 0755 "$(readlink -f "$lib")" "$ROOT$lib"
    done
else
    log "no qemu-ga on the host (qemu-guest-agent): the guest has no agent"
fi

# busybox cpio: paths relative to the root, newc format, owned by root
(cd "$ROOT" && find . -mindepth 1 | sort |
     "$BUSYBOX" cpio -o -H newc 2>/dev/null) | gzip -9 >"$WORK/initrd.img"

cp "$vmlinuz" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$CACHE/vmlinuz"
mv -f "$WORK/initrd.img" "$CACHE/initrd.img"
cat >"$CACHE/guest.env" <<EOF
KERNEL='$CACHE/vmlinuz'
INITRD='$CACHE/initrd.img'
KERNEL_VERSION='$KVER'
KERNEL_PACKAGE='$kpkg $kver_pkg'
BUSYBOX_PACKAGE='busybox-static $bver_pkg'
STAMP='$stamp'
EOF
echo "GUEST_AGENT='${QEMU_GA:+1}'" >>"$CACHE/guest.env"
log "guest ready: $CACHE/vmlinuz ($(du -h "$CACHE/vmlinuz" | cut -f1)), \
$CACHE/initrd.img ($(du -h "$CACHE/initrd.img" | cut -f1))"
echo "KERNEL=$CACHE/vmlinuz"
echo "INITRD=$CACHE/initrd.img"
