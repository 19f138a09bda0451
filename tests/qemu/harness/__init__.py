"""Test harness for extlock's QEMU-level tests and the demo.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Modules:
  ganesha      loopback NFS export served by nfs-ganesha (+ rpcbind)
  qmp          synchronous QMP client (UNIX socket)
  coordinator  minimal client of the extlockd wire protocol
  procs        locating binaries; running extlockd, qemu-storage-daemon,
               qemu-system-x86_64, qemu-io and qemu-img; blockdev options
  patterns     writing/verifying byte patterns in raw images
"""
