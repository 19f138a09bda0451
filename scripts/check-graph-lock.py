#!/usr/bin/python3
# Check the extlock driver's graph-lock annotations with clang's thread
# safety analysis, as a clang build of QEMU 10.0 would (QEMU enables
# -Wthread-safety with clang; with gcc GRAPH_RDLOCK and friends are empty).
#
#   scripts/check-graph-lock.py [QEMU_10_BUILD_DIR]   (default build/qemu-10.0)
#
# Recompiles only block/extlock/*.c, with the gcc build's own compile
# commands (compile_commands.json) run by clang, objects thrown away.
# Exit status 1 when clang reports a -Wthread-safety warning or cannot
# compile a file, 2 when the build directory is not usable.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# gcc-only options clang rejects or warns about
GCC_ONLY = ("-Wold-style-declaration", "-Wimplicit-fallthrough=2", "-MD")
GCC_ONLY_PREFIXES = ("-fzero-call-used-regs=", "-ftrivial-auto-var-init=")


def clang_args(command, obj):
    args = shlex.split(command)
    if os.path.basename(args[0]) == "ccache":
        args = args[1:]
    out = ["clang"]
    skip = False
    for i, a in enumerate(args[1:], 1):
        if skip:
            skip = False
            continue
        if a in ("-MF", "-MQ", "-o"):
            skip = True
            continue
        if a in GCC_ONLY or a.startswith(GCC_ONLY_PREFIXES):
            continue
        out.append(a)
    return out + ["-o", obj, "-Wthread-safety", "-Wno-unknown-warning-option"]


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "build", "qemu-10.0")
    db = os.path.join(build, "compile_commands.json")
    if not os.path.isfile(db):
        print(f"check-graph-lock: no {db}: build QEMU 10.0 first "
              "(scripts/build-qemu.sh --qemu 10.0)", file=sys.stderr)
        return 2
    if not shutil.which("clang"):
        print("check-graph-lock: clang missing (scripts/install-deps.sh)", file=sys.stderr)
        return 2
    with open(db) as f:
        entries = [e for e in json.load(f)
                   if "/block/extlock/" in e["file"] and e["file"].endswith(".c")]
    if not entries:
        print(f"check-graph-lock: no block/extlock files in {db}", file=sys.stderr)
        return 2
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for e in sorted(entries, key=lambda e: e["file"]):
            name = os.path.basename(e["file"])
            r = subprocess.run(clang_args(e["command"], os.path.join(tmp, name + ".o")),
                               cwd=e["directory"], capture_output=True, text=True)
            tsa = [ln for ln in r.stderr.splitlines() if "-Wthread-safety" in ln]
            if r.returncode != 0 or tsa:
                bad += 1
                print(f"check-graph-lock: {name}: "
                      + ("does not compile with clang" if r.returncode else
                         f"{len(tsa)} thread-safety warning(s)"))
                print(r.stderr)
            else:
                print(f"check-graph-lock: {name}: ok")
    print(f"check-graph-lock: {len(entries) - bad} of {len(entries)} files clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
