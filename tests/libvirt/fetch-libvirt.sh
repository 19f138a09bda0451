#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
#
# Unpack a libvirt other than the machine's (or its sanlock plugin) into a
# private prefix, without installing it: `apt-get download` the .debs of
# the given version and `dpkg -x` them.  The machine keeps its libvirt 9.0.
#
#   tests/libvirt/fetch-libvirt.sh [--version V] [--sanlock] PREFIX
#   tests/libvirt/fetch-libvirt.sh --machine-sanlock
#
#   --version V   a version apt-cache policy lists (default: the one in
#                 bookworm-backports, 11.3.0-2~bpo12+1)
#   --sanlock     also the sanlock lock plugin of that version and the
#                 sanlock daemon of the machine's release
#   --machine-sanlock  the machine's libvirt version with --sanlock into
#                 ${EXTLOCK_CACHE:-~/.cache/extlock}/libvirt-VERSION-sanlock,
#                 unless it is there already: what test_sanlock_coexistence
#                 uses when EXTLOCK_LIBVIRT_PREFIX is not set.  Run it outside
#                 scripts/isolate.sh (it needs the Debian archive);
#                 scripts/run-tests.sh does.
#
# Then run the tests with it:
#   EXTLOCK_LIBVIRT_PREFIX=PREFIX scripts/isolate.sh /usr/bin/python3 -m pytest tests/libvirt
# (tests/libvirt/libvirt_harness.py bind-mounts PREFIX's daemons, modules,
# libraries and data over the system's inside libvirtd's own mount
# namespace; see docs/libvirt.rst).
set -euo pipefail

version=11.3.0-2~bpo12+1
sanlock=0
if [ "$*" = --machine-sanlock ]; then
    version=$(dpkg-query -W -f '${Version}' libvirt-daemon)
    prefix=${EXTLOCK_CACHE:-$HOME/.cache/extlock}/libvirt-$version-sanlock
    if [ -x "$prefix/usr/sbin/sanlock" ] &&
       [ -e "$prefix/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/sanlock.so" ]; then
        echo "libvirt $version with sanlock: $prefix (cached)"
        exit 0
    fi
    set -- --sanlock "$prefix"
fi
while [ $# -gt 1 ]; do
    case "$1" in
    --version) version=$2; shift 2 ;;
    --sanlock) sanlock=1; shift ;;
    *) echo "fetch-libvirt.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: fetch-libvirt.sh [--version V] [--sanlock] PREFIX" >&2
    echo "       fetch-libvirt.sh --machine-sanlock" >&2
    exit 2
fi
prefix=$(realpath -m "$1")

pkgs=(libvirt0 libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu)
case "$version" in
9.*|10.*) pkgs+=() ;;   # virtlockd and lockd.so are in libvirt-daemon
*) pkgs+=(libvirt-common libvirt-daemon-common libvirt-daemon-log
          libvirt-daemon-lock libvirt-daemon-plugin-lockd) ;;
esac
if [ "$sanlock" = 1 ]; then
    case "$version" in
    9.*) pkgs+=(libvirt-sanlock) ;;
    *) pkgs+=(libvirt-daemon-plugin-sanlock) ;;
    esac
fi

debs=$prefix/debs
mkdir -p "$debs"
args=()
for p in "${pkgs[@]}"; do
    args+=("$p=$version")
done
if [ "$sanlock" = 1 ]; then
    # the daemon and its library come from the machine's release
    args+=(sanlock libsanlock1 libsanlock-client1 libaio1)
fi
# _apt cannot write into root's directories: download in a directory of its own
tmp=$(mktemp -d)
chmod 755 "$tmp"
chown _apt "$tmp" 2>/dev/null || true
(cd "$tmp" && apt-get download -q "${args[@]}")
mv "$tmp"/*.deb "$debs"/
rmdir "$tmp"
for d in "$debs"/*.deb; do
    dpkg -x "$d" "$prefix"
done
echo "libvirt $version unpacked: $prefix"
