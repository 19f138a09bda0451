#!/bin/bash
# Start or stop a loopback NFS export (nfs-ganesha on 127.0.0.1) for manual
# use and for the demo.  A thin wrapper around tests/qemu/harness/ganesha.py,
# which the QEMU-level tests use as well (see docs/testing.rst).
#
#   scripts/nfs-server.sh start [--dir DIR]   prints the export path and URL
#   scripts/nfs-server.sh status --dir DIR
#   scripts/nfs-server.sh stop --dir DIR
#
# rpcbind is started if none is running (and stopped again by "stop" only if
# it was started here).  Needs root, nfs-ganesha, nfs-ganesha-vfs, rpcbind and
# libnfs-utils (scripts/install-deps.sh).
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
exec /usr/bin/python3 "$REPO/tests/qemu/harness/ganesha.py" "$@"
