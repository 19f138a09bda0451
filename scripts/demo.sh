#!/bin/bash
# The README's demo: two QEMU processes share one raw image on a loopback
# NFS export through extlock nodes, coordinated by extlockd.  Everything it
# starts (nfs-ganesha, rpcbind if none ran, extlockd, qemu-storage-daemon,
# qemu-io) is stopped again at the end.  See scripts/demo.py.
#
# Run as root on Debian 12.  It first installs what is missing (apt-get),
# builds extlockd and the tools (build/) and the patched QEMU (build/qemu);
# both builds are incremental.  --guests runs the two-guest end-to-end
# demo (tests/e2e/run-guests.py) after the storage-daemon one.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
guests=0
args=()
for a in "$@"; do
    if [ "$a" = "--guests" ]; then guests=1; else args+=("$a"); fi
done
bash scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
bash scripts/build-qemu.sh
/usr/bin/python3 scripts/demo.py "${args[@]}"
if [ "$guests" = 1 ]; then
    /usr/bin/python3 tests/e2e/run-guests.py --seconds 20 --live
fi
