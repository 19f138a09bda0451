#!/bin/bash
# The README's demo: two QEMU processes share one raw image on a loopback
# NFS export through extlock nodes, coordinated by extlockd.  Everything it
# starts (nfs-ganesha, rpcbind if none ran, extlockd, qemu-storage-daemon,
# qemu-io) is stopped again at the end.  See scripts/demo.py.
#
# Run as root on Debian 12.  It first installs what is missing (apt-get),
# builds extlockd and the tools (build/) and the patched QEMU 10.0
# (build/qemu-10.0; EXTLOCK_QEMU_BUILD=build/qemu with a QEMU 7.2 built by
# scripts/build-qemu.sh --qemu 7.2 runs it on 7.2 instead);
# both builds are incremental.  Then two scenes:
#  1. scripts/demo.py: two qemu-storage-daemon processes ("hosts") share one
#     raw image on NFS; overlapping I/O, live query-extent-locks and
#     extlockctl, data check;
#  2. tests/e2e/run-guests.py --live: two tiny Debian guests share one
#     virtio-blk disk on NFS through extlock, with live lock status and the
#     atomicity checker's result; then the same without extlock, for
#     comparison (KVM when usable, else TCG).
# --no-guests skips scene 2; other options go to scripts/demo.py.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
guests=1
args=()
for a in "$@"; do
    if [ "$a" = "--no-guests" ]; then guests=0; else args+=("$a"); fi
done
bash scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
bash scripts/build-qemu.sh
/usr/bin/python3 scripts/demo.py ${args[@]+"${args[@]}"}
if [ "$guests" = 1 ]; then
    echo
    echo "=== Two guests share one disk (tiny Debian guests, O_DIRECT stamped extents) ==="
    /usr/bin/python3 tests/e2e/run-guests.py --seconds 20 --live
fi
