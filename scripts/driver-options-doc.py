#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
"""The options table of docs/qemu-driver.rst, from the QAPI schema.

    scripts/driver-options-doc.py [--check | --write]

Reads BlockdevOptionsExtlock (its members, types and the "(default: ...)"
of each member's doc comment) from the QAPI hunk of
patches/qemu-7.2-extlock.patch, and the options blockdev-reopen may change
from extlock_mutable_opts in block/extlock.c, and renders the table that
sits between the ".. options-table-start" and ".. options-table-end"
comments of docs/qemu-driver.rst.  Every option must also have its own
entry (````name````) in the list below the table.

--check (the default) exits 1 and prints a diff if the document differs;
--write rewrites the table.
"""

import difflib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCH = REPO / "patches" / "qemu-7.2-extlock.patch"
DRIVER = REPO / "block" / "extlock.c"
DOC = REPO / "docs" / "qemu-driver.rst"
START, END = ".. options-table-start", ".. options-table-end"


def schema_text():
    """The '+' lines of the patch's block-core.json hunk, without the '+'."""
    out, in_core = [], False
    for line in PATCH.read_text().splitlines():
        if line.startswith("+++ "):
            in_core = line.split()[1].endswith("qapi/block-core.json")
        elif in_core and line.startswith("+"):
            out.append(line[1:])
    return "\n".join(out)


def options():
    """[(name, type, required, default)] of BlockdevOptionsExtlock."""
    text = schema_text()
    doc = text[text.index("# @BlockdevOptionsExtlock:"):]
    doc, body = doc.split("\n##\n", 1)
    body = body[body.index("'data':"):body.index("} }") + 3]
    docs, cur = {}, None
    for line in doc.splitlines():
        m = re.match(r"# @([a-z-]+): ?(.*)", line)
        if m:
            cur = m.group(1)
            docs[cur] = m.group(2)
        elif cur and line.startswith("#  "):
            docs[cur] += " " + line[1:].strip()
        elif line.strip() == "#":
            cur = None
    result = []
    for name, typ in re.findall(r"'(\*?[a-z-]+)': (\[?'[A-Za-z0-9]+'\]?)",
                                body):
        typ = typ.replace("'", "")          # ['T'] -> [T], a list of T
        required = not name.startswith("*")
        name = name.lstrip("*")
        m = re.search(r"\(default: ([^)]*)\)", docs.get(name, ""))
        default = m.group(1).replace("@", "") if m else "-"
        result.append((name, typ, required, default))
    return result


def mutable():
    src = DRIVER.read_text()
    block = src[src.index("extlock_mutable_opts[] = {"):]
    block = block[:block.index("};")]
    return set(re.findall(r'"([a-z-]+)"', block))


def table():
    rows = [("option", "type", "default", "reopen")]
    can_change = mutable()
    for name, typ, required, default in options():
        default = "required" if required else default
        rows.append((f"``{name}``", typ, default,
                     "yes" if name in can_change else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)

    def fmt(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [rule, fmt(rows[0]), rule] + [fmt(r) for r in rows[1:]] + [rule]
    return lines


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "--check"
    doc = DOC.read_text().splitlines()
    start, end = doc.index(START), doc.index(END)
    new = doc[:start + 1] + [""] + table() + [""] + doc[end:]
    entries = "\n".join(doc[end:])
    missing = [n for n, *_ in options()
               if not re.search(rf"^``{n}``( \(required\))?$", entries, re.M)]
    if missing:
        print("docs/qemu-driver.rst: no entry for: " + ", ".join(missing))
        return 1
    if mode == "--write":
        DOC.write_text("\n".join(new) + "\n")
        return 0
    if new != doc:
        sys.stdout.writelines(difflib.unified_diff(
            [line + "\n" for line in doc], [line + "\n" for line in new],
            "docs/qemu-driver.rst", "generated"))
        print("docs/qemu-driver.rst: options table out of date; "
              "run scripts/driver-options-doc.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
