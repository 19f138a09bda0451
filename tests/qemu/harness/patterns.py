"""Byte-pattern helpers for checking what ended up in a raw image.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

qemu-io writes constant byte patterns (write -P 0xNN).  When several
writers each write whole extents with their own pattern, a correctly
serialised result has every extent uniformly one writer's pattern; a torn
(interleaved) write shows up as an extent that holds a mix of patterns.
"""

from pathlib import Path


def extent_summary(data):
    """{byte value: count} of one extent's bytes (cheap for uniform data)."""
    first = data[0]
    if data.count(first) == len(data):
        return {first: len(data)}
    return {b: data.count(bytes([b])) for b in sorted(set(data))}


def check_uniform_extents(path, extent_size, count, allowed, offset=0):
    """Read `count` extents of `extent_size` bytes from a local file.

    Returns (patterns, problems): patterns[i] is the byte value filling
    extent i (None if mixed); problems is a list of human-readable
    descriptions of every extent that is not uniformly one of `allowed`.
    """
    patterns, problems = [], []
    with open(Path(path), "rb") as f:
        f.seek(offset)
        for i in range(count):
            data = f.read(extent_size)
            start = offset + i * extent_size
            if len(data) != extent_size:
                patterns.append(None)
                problems.append(f"extent {i} at {start:#x}: short read "
                                f"({len(data)} bytes)")
                continue
            summary = extent_summary(data)
            if len(summary) == 1:
                value = next(iter(summary))
                patterns.append(value)
                if value not in allowed:
                    problems.append(f"extent {i} at {start:#x}: pattern "
                                    f"{value:#04x} not written by anyone")
                continue
            patterns.append(None)
            desc = ", ".join(f"{b:#04x} x {n}" for b, n in summary.items())
            where = first_change(data)
            problems.append(f"extent {i} at {start:#x} is mixed ({desc}); "
                            f"first change at +{where:#x}")
    return patterns, problems


def first_change(data):
    """Offset of the first byte that differs from data[0] (len if none)."""
    first = data[:1]
    stripped = data.lstrip(first)
    return len(data) - len(stripped)


def fill(path, offset, length, value):
    """Write `length` bytes of `value` at `offset` of a local file (used to
    give an image real data before any QEMU process opens it)."""
    with open(Path(path), "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]) * length)
        f.flush()
