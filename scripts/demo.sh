#!/bin/bash
# The README's demo: two QEMU processes share one raw image on a loopback
# NFS export through extlock nodes, coordinated by extlockd.  Everything it
# starts (nfs-ganesha, rpcbind if none ran, extlockd, qemu-storage-daemon,
# qemu-io) is stopped again at the end.  See scripts/demo.py.
#
# Run as root on Debian 12 once the builds exist (build/ for extlockd and
# extlockctl, build/qemu for QEMU; EXTLOCK_BUILD / EXTLOCK_QEMU_BUILD
# override the locations).
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
exec /usr/bin/python3 "$REPO/scripts/demo.py" "$@"
