#!/usr/bin/python3
"""Host-side check of an image written by extlock-stress (docs/e2e.rst).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

After the guests of the end-to-end test (tests/e2e/run-guests.py) have
finished, every extent of the data area must hold exactly one complete
write: all of its sectors carry the same stamp (guest, sequence), or all
are zero (never written).  An extent with two stamps, or with written and
zero sectors, is a *mixed* extent: two writes reached the image
interleaved.  A sector that is neither zero nor a valid stamp of this
extent and this run (wrong magic, run id, guest, position or body, or a
sequence number larger than that guest's last write) is *corrupt*.
Outside the data area only the control area's ready records may be
non-zero; other non-zero sectors there are *stray*.

The sector layout and the body function are those of
contrib/guest/extlock-stress.c; keep them in sync.

    verify-image.py IMAGE --run-id N --guests N [--extent-size 256K]
                    [--extents 16] [--data-offset 1M] [--control-offset 0]
                    [--max-seq GUEST=SEQ ...] [--json]

    verify-image.py --self-test

Prints the counts (one JSON object with --json).  --self-test checks the
checker itself on a synthetic image with every kind of extent.  Exit status: 0 if no
extent is mixed and nothing is corrupt or stray, 1 otherwise, 2 on usage
errors or an unreadable image.
"""

import argparse
import json
import os
import struct
import sys

SECTOR = 512
STAMP_MAGIC = b"XLSTRESS"
READY_MAGIC = b"XLREADY\0"
# magic[8] run_id seq guest extent sector nsectors
HEADER = struct.Struct("<8sQQIIII")
BODY_WORDS = (SECTOR - HEADER.size) // 8
MASK = (1 << 64) - 1
ZERO_SECTOR = bytes(SECTOR)
MAX_DETAILS = 10


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def body_word(run_id, guest, seq, extent, sector):
    """The word that fills a sector's body (extlock-stress.c: body_word)."""
    x = splitmix64(run_id ^ guest)
    x = splitmix64(x ^ seq)
    return splitmix64(x ^ ((extent << 32) | sector))


def parse_size(text):
    text = str(text).strip()
    mult = 1
    if text and text[-1] in "kKmMgG":
        mult = 1 << {"k": 10, "m": 20, "g": 30}[text[-1].lower()]
        text = text[:-1]
    return int(text, 0) * mult


class Layout:
    def __init__(self, run_id, guests, extent_size, extents, data_offset,
                 control_offset, max_seq=None):
        if extent_size % SECTOR or data_offset % SECTOR or control_offset % SECTOR:
            raise ValueError("sizes and offsets must be multiples of 512")
        self.run_id = run_id
        self.guests = guests
        self.extent_size = extent_size
        self.nsectors = extent_size // SECTOR
        self.extents = extents
        self.data_offset = data_offset
        self.data_end = data_offset + extents * extent_size
        self.control_offset = control_offset
        self.control_end = control_offset + (guests + 1) * SECTOR
        self.max_seq = dict(max_seq or {})


def classify_sector(layout, data, extent, index):
    """('zero', None) | ('stamp', (guest, seq)) | ('corrupt', reason)."""
    if data == ZERO_SECTOR:
        return "zero", None
    magic, run_id, seq, guest, ext, sec, nsect = HEADER.unpack_from(data)
    if magic != STAMP_MAGIC:
        return "corrupt", "bad magic"
    if run_id != layout.run_id:
        return "corrupt", f"run id {run_id:#x}, expected {layout.run_id:#x}"
    if not 1 <= guest <= layout.guests:
        return "corrupt", f"guest {guest} out of range"
    if seq < 1 or (guest in layout.max_seq and seq > layout.max_seq[guest]):
        return "corrupt", f"guest {guest} never made write {seq}"
    if ext != extent or sec != index or nsect != layout.nsectors:
        return "corrupt", (f"stamp of extent {ext} sector {sec}/{nsect} "
                           f"found at extent {extent} sector {index}")
    word = struct.pack("<Q", body_word(run_id, guest, seq, ext, sec))
    if data[HEADER.size:] != word * BODY_WORDS:
        return "corrupt", "body does not match the header"
    return "stamp", (guest, seq)


def check_extent(layout, data, extent):
    """Classify one extent: unwritten, complete, mixed or corrupt."""
    stamps = {}
    zero = 0
    corrupt = []
    for i in range(layout.nsectors):
        kind, what = classify_sector(layout, data[i * SECTOR:(i + 1) * SECTOR],
                                     extent, i)
        if kind == "zero":
            zero += 1
        elif kind == "stamp":
            stamps[what] = stamps.get(what, 0) + 1
        else:
            corrupt.append((i, what))
    if corrupt:
        kind = "corrupt"
    elif zero == layout.nsectors:
        kind = "unwritten"
    elif zero == 0 and len(stamps) == 1:
        kind = "complete"
    else:
        kind = "mixed"
    return {
        "extent": extent,
        "kind": kind,
        "zero_sectors": zero,
        "stamps": {f"{g}:{s}": n for (g, s), n in sorted(stamps.items())},
        "corrupt_sectors": len(corrupt),
        "first_corrupt": (f"sector {corrupt[0][0]}: {corrupt[0][1]}"
                          if corrupt else None),
    }


def nonzero_sectors(f, start, end):
    """Number of non-zero sectors in [start, end) of the file."""
    count = 0
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(1 << 20, end - pos))
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            for i in range(0, len(chunk), SECTOR):
                if chunk[i:i + SECTOR].count(0) != len(chunk[i:i + SECTOR]):
                    count += 1
        pos += len(chunk)
    return count


def verify(path, layout):
    """Check the image; return a dict of counts and details."""
    size = os.path.getsize(path)
    result = {
        "image": str(path),
        "size": size,
        "extents": layout.extents,
        "extent_size": layout.extent_size,
        "complete": 0,
        "unwritten": 0,
        "mixed": 0,
        "corrupt": 0,
        "stray_sectors": 0,
        "ready_records": 0,
        "writes_seen": {},
        "details": [],
    }
    if size < layout.data_end:
        raise ValueError(f"{path} has {size} bytes, the data area ends at "
                         f"{layout.data_end}")
    with open(path, "rb") as f:
        for e in range(layout.extents):
            f.seek(layout.data_offset + e * layout.extent_size)
            data = f.read(layout.extent_size)
            r = check_extent(layout, data, e)
            result[r["kind"]] += 1
            if r["kind"] == "complete":
                guest = next(iter(r["stamps"])).split(":")[0]
                result["writes_seen"][guest] = result["writes_seen"].get(guest, 0) + 1
            elif r["kind"] in ("mixed", "corrupt") and \
                    len(result["details"]) < MAX_DETAILS:
                result["details"].append(r)
        # the control area: only ready records of this run
        f.seek(layout.control_offset)
        ctl = f.read(layout.control_end - layout.control_offset)
        for g in range(layout.guests + 1):
            rec = ctl[g * SECTOR:(g + 1) * SECTOR]
            if rec == ZERO_SECTOR:
                continue
            magic, run_id, guest, _phase = struct.unpack_from("<8sQII", rec)
            if g >= 1 and magic == READY_MAGIC and run_id == layout.run_id \
                    and guest == g:
                result["ready_records"] += 1
            else:
                result["stray_sectors"] += 1
        # everything else must be untouched
        regions = [(0, layout.control_offset),
                   (layout.control_end, size)]
        holes = []
        for start, end in regions:
            # cut the data area out of each region
            for s, e in ((start, min(end, layout.data_offset)),
                         (max(start, layout.data_end), end)):
                if s < e:
                    holes.append((s, e))
        for s, e in holes:
            result["stray_sectors"] += nonzero_sectors(f, s, e)
    result["ok"] = (result["mixed"] == 0 and result["corrupt"] == 0
                    and result["stray_sectors"] == 0)
    return result


def make_sector(layout, guest, seq, extent, index):
    """A sector as extlock-stress writes it (for the self-test)."""
    head = HEADER.pack(STAMP_MAGIC, layout.run_id, seq, guest, extent, index,
                       layout.nsectors)
    return head + struct.pack("<Q", body_word(layout.run_id, guest, seq, extent,
                                              index)) * BODY_WORDS


def self_test():
    """Check the checker on a synthetic image: every kind must be found."""
    import tempfile
    layout = Layout(run_id=0x1234, guests=2, extent_size=8 * SECTOR, extents=6,
                    data_offset=4096, control_offset=0, max_seq={1: 10, 2: 10})
    n = layout.nsectors
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(layout.data_end + 8192)

        def put(extent, sectors):
            f.seek(layout.data_offset + extent * layout.extent_size)
            f.write(b"".join(sectors))
        # 0: complete (guest 1, write 3); 1: unwritten
        put(0, [make_sector(layout, 1, 3, 0, i) for i in range(n)])
        # 2: mixed, two stamps split at a 4-sector boundary
        put(2, [make_sector(layout, 1 if i < 4 else 2, 5, 2, i) for i in range(n)])
        # 3: mixed, written and zero sectors
        put(3, [make_sector(layout, 2, 7, 3, i) if i % 2 else ZERO_SECTOR
                for i in range(n)])
        # 4: corrupt: one sector's body damaged
        sectors = [make_sector(layout, 2, 1, 4, i) for i in range(n)]
        sectors[5] = sectors[5][:100] + b"\xff" + sectors[5][101:]
        put(4, sectors)
        # 5: corrupt: a write guest 1 never made (seq 11 > max 10)
        put(5, [make_sector(layout, 1, 11, 5, i) for i in range(n)])
        # a stray sector after the data area
        f.seek(layout.data_end + 1024)
        f.write(b"x")
        f.flush()
        r = verify(f.name, layout)
    expect = {"complete": 1, "unwritten": 1, "mixed": 2, "corrupt": 2,
              "stray_sectors": 1, "ok": False}
    got = {k: r[k] for k in expect}
    if got != expect:
        print(f"verify-image: self-test FAILED: expected {expect}, got {got}",
              file=sys.stderr)
        return 1
    print(f"verify-image: self-test passed ({got})")
    return 0


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--self-test"]:
        return self_test()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image")
    p.add_argument("--run-id", required=True, type=lambda s: int(s, 0))
    p.add_argument("--guests", required=True, type=int)
    p.add_argument("--extent-size", default="256K", type=parse_size)
    p.add_argument("--extents", default=16, type=int)
    p.add_argument("--data-offset", default="1M", type=parse_size)
    p.add_argument("--control-offset", default="0", type=parse_size)
    p.add_argument("--max-seq", action="append", default=[],
                   metavar="GUEST=SEQ",
                   help="the last sequence number a guest used")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        max_seq = {}
        for item in args.max_seq:
            g, s = item.split("=", 1)
            max_seq[int(g)] = int(s)
        layout = Layout(args.run_id, args.guests, args.extent_size,
                        args.extents, args.data_offset, args.control_offset,
                        max_seq)
        result = verify(args.image, layout)
    except (OSError, ValueError) as e:
        print(f"verify-image: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{result['image']}: {result['extents']} extents of "
              f"{result['extent_size']} bytes: {result['complete']} complete, "
              f"{result['unwritten']} unwritten, {result['mixed']} mixed, "
              f"{result['corrupt']} corrupt; {result['stray_sectors']} stray "
              f"sectors outside the data area")
        for d in result["details"]:
            print(f"  extent {d['extent']}: {d['kind']}, stamps {d['stamps']}, "
                  f"{d['zero_sectors']} zero, {d['corrupt_sectors']} corrupt"
                  + (f" ({d['first_corrupt']})" if d["first_corrupt"] else ""))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
