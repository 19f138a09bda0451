"""qcow2 shared through extlock: unsafe stacks refused, metadata frozen.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

extlock locks the guest's data; qcow2's metadata (L1/L2 tables, refcounts,
header, bitmaps) is cached by each host's qcow2 driver and must therefore
never change while several hosts share the image (docs/qcow2.rst).  These
tests check, with real QEMU processes:

* the refusals at open and at blockdev-add (thin, compressed, zero and
  backing-file clusters, lazy refcounts, bitmaps, internal snapshots,
  detect-zeroes below extlock, formats with allocation metadata) and the
  explicit, unsafe allocation-check=off;
* three hosts writing stamped extents to a preallocated qcow2 (metadata,
  falloc, full) on the loopback NFS server, reading them at the same time:
  no torn read, no mixed extent (contrib/guest/verify-image.py, the
  stamped checker of the end-to-end test), qemu-img check clean, metadata
  byte-identical;
* guest discard and write-zeroes leave the metadata byte-identical (and
  the control: the same requests on the qcow2 node without extlock change
  it);
* header and metadata byte-identical after many opens, closes and kill -9
  on three hosts (and the control: a qcow2 with a persistent bitmap,
  opened without extlock, does get its header rewritten).

"Metadata" is every byte of the image file outside its data clusters:
qemu-img map gives the data clusters' host offsets.
"""

import hashlib
import importlib.util
import json
import random
import uuid
from pathlib import Path

import pytest

from harness import procs as hp
from harness.coordinator import coordinator_status
from harness.faults import NbdClient
from harness.procs import extlock_node

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
THIN_HINT = "qemu-img create -f qcow2 -o preallocation=metadata|falloc|full"


def load_verify_image():
    path = Path(__file__).resolve().parents[2] / "contrib" / "guest" / "verify-image.py"
    spec = importlib.util.spec_from_file_location("verify_image", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# images

def qemu_img(*args):
    r = hp.run_qemu_img(*args)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def create_qcow2(path, size, prealloc=None, extra=()):
    opts = [f"cluster_size={CLUSTER}"]
    if prealloc:
        opts.append(f"preallocation={prealloc}")
    opts += list(extra)
    qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join(opts), str(path), str(size))
    return path


def qcow2_io(path, *cmds):
    """Run qemu-io commands on the qcow2 image directly (no extlock)."""
    r = hp.run_qemu_io({"driver": "qcow2", "file": hp.file_child(path)}, list(cmds))
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout


def data_ranges(path):
    """Host (offset, length) of every cluster that holds guest data."""
    out = qemu_img("map", "--output=json", "-f", "qcow2", str(path))
    return sorted((m["offset"], m["length"]) for m in json.loads(out) if "offset" in m)


def metadata_digest(path, ranges=None):
    """sha256 of the image file without its data clusters: the header, the
    L1/L2 and refcount tables, header extensions, bitmaps, snapshots."""
    ranges = data_ranges(path) if ranges is None else ranges
    h = hashlib.sha256()
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for off, length in ranges:
        h.update(data[pos:off])
        pos = max(pos, off + length)
    h.update(data[pos:])
    h.update(str(len(data)).encode())
    return h.hexdigest()


def check_clean(path):
    r = hp.run_qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def qcow2_child(file_child, **opts):
    return dict({"driver": "qcow2", "file": file_child}, **opts)


def open_through_extlock(extlockd, lock_space, child, **extra):
    """Open the stack with qemu-io through an extlock node; returns the
    CompletedProcess of `qemu-io -c 'read 0 512'`."""
    node = extlock_node(child, extlockd.coordinator(), lock_space, **extra)
    return hp.run_qemu_io(node, ["read -q 0 512"], timeout=60)


def refused(r, *phrases):
    text = r.stdout + r.stderr
    assert r.returncode != 0, f"opened although it should be refused: {text}"
    for p in phrases:
        assert p in text, f"{p!r} not in: {text}"
    return text


def accepted(r):
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), \
        r.stdout + r.stderr


# ---------------------------------------------------------------------------
# refusals (local files: the decision does not depend on the protocol)

@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocated_qcow2_accepted(prealloc, extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "p.qcow2", 8 * MiB, prealloc)
    accepted(open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img))))


def test_thin_qcow2_refused(extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "thin.qcow2", 8 * MiB)
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img)))
    refused(r, f"qcow2 image '{img}' is not fully allocated",
            "guest offset 0 is unallocated", THIN_HINT)
    # partly written: the first hole is named
    qcow2_io(img, f"write -P 0x5a 0 {3 * CLUSTER}")
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img)))
    refused(r, f"guest offset {3 * CLUSTER} is unallocated", THIN_HINT)


def test_thin_qcow2_refused_at_blockdev_add(extlockd, lock_space, procs, workdir,
                                            binaries):
    """The same refusal over QMP; no extlock node is left behind and the
    coordinator never saw a session."""
    binaries("qemu-img", "qemu-storage-daemon")
    img = create_qcow2(workdir / "thin.qcow2", 8 * MiB)
    qsd = procs.storage_daemon()
    qsd.qmp.execute("blockdev-add", qcow2_child(hp.file_child(img), **{"node-name": "q0"}))
    e = qsd.qmp.execute_error("blockdev-add", extlock_node(
        "q0", extlockd.coordinator(), lock_space, node_name="xl0"))
    assert "is not fully allocated" in e.desc and THIN_HINT in e.desc, e.desc
    names = [n["node-name"] for n in qsd.qmp.execute("query-named-block-nodes")]
    assert "xl0" not in names
    assert qsd.qmp.execute("query-extent-locks") == []
    spaces = coordinator_status(extlockd.address)["lock-spaces"]
    assert lock_space not in [sp["name"] for sp in spaces]


def test_zero_cluster_refused(extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "z.qcow2", 8 * MiB, "metadata")
    qcow2_io(img, f"write -z {MiB} {CLUSTER}")         # sets the zero flag
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img)))
    refused(r, f"guest offset {MiB} is a zero cluster", THIN_HINT)


def test_compressed_cluster_refused(extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    raw = workdir / "src.raw"
    raw.write_bytes(bytes([0x42]) * MiB)
    img = workdir / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img)))
    refused(r, "guest offset 0 is a compressed cluster", THIN_HINT)


def test_backing_chain(extlockd, lock_space, workdir, binaries):
    """A top image that leaves clusters to its backing file is refused;
    once every cluster is in the top image it is accepted."""
    binaries("qemu-img", "qemu-io")
    base = create_qcow2(workdir / "base.qcow2", 4 * MiB, "full")
    top = workdir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             "-b", str(base), "-F", "qcow2", str(top))
    qcow2_io(top, f"write -P 0x11 0 {MiB}")
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(top)))
    refused(r, f"guest offset {MiB} is unallocated: its data comes from the backing file")
    qcow2_io(top, f"write -P 0x22 {MiB} {3 * MiB}")
    accepted(open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(top))))


def test_allocation_check_off(extlockd, lock_space, procs, workdir, binaries):
    """The explicit, unsafe skip: a thin image opens, and the node says
    the check was off."""
    binaries("qemu-img", "qemu-storage-daemon")
    img = create_qcow2(workdir / "thin.qcow2", 8 * MiB)
    qsd = procs.storage_daemon(blockdevs=[extlock_node(
        qcow2_child(hp.file_child(img)), extlockd.coordinator(), lock_space,
        node_name="xl0", allocation_check=False)])
    stack = qsd.qmp.execute("query-extent-locks")[0]["stack"]
    assert stack == {"metadata-frozen": True, "allocation-check": False,
                     "discards-ignored": 0, "zero-writes-as-data": 0}


def test_raw_stack_not_frozen(local_image, extlockd, lock_space, procs, binaries):
    """raw: nothing to freeze, requests go through as before."""
    binaries("qemu-storage-daemon")
    qsd = procs.storage_daemon(blockdevs=[extlock_node(
        local_image.child, extlockd.coordinator(), lock_space, node_name="xl0")])
    assert qsd.qmp.execute("query-extent-locks")[0]["stack"]["metadata-frozen"] is False


@pytest.mark.parametrize("case", ["lazy-refcounts", "bitmap", "snapshot"])
def test_metadata_writing_images_refused(case, extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = workdir / "m.qcow2"
    if case == "lazy-refcounts":
        create_qcow2(img, 4 * MiB, "metadata", ["lazy_refcounts=on"])
        expect = "uses lazy refcounts"
    elif case == "bitmap":
        create_qcow2(img, 4 * MiB, "metadata")
        qemu_img("bitmap", "--add", str(img), "b0")
        expect = "has persistent dirty bitmaps"
    else:
        create_qcow2(img, 4 * MiB, "metadata")
        qemu_img("snapshot", "-c", "s0", str(img))
        expect = "has 1 internal snapshot(s)"
    r = open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img)))
    refused(r, f"qcow2 image '{img}' {expect}")


def test_lazy_refcounts_option(extlockd, lock_space, workdir, binaries):
    """lazy-refcounts=on on the qcow2 node is refused; an image created
    with lazy refcounts is accepted when the node turns them off."""
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "p.qcow2", 4 * MiB, "metadata")
    r = open_through_extlock(extlockd, lock_space,
                             qcow2_child(hp.file_child(img), **{"lazy-refcounts": True}))
    refused(r, "uses lazy refcounts")
    lazy = create_qcow2(workdir / "l.qcow2", 4 * MiB, "metadata", ["lazy_refcounts=on"])
    accepted(open_through_extlock(extlockd, lock_space,
                                  qcow2_child(hp.file_child(lazy),
                                              **{"lazy-refcounts": False})))


def test_detect_zeroes_below_refused(extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "p.qcow2", 4 * MiB, "metadata")
    r = open_through_extlock(extlockd, lock_space,
                             qcow2_child(hp.file_child(img), **{"detect-zeroes": "on",
                                                                "node-name": "q0"}))
    refused(r, "node 'q0' has detect-zeroes")


def test_other_formats_refused(extlockd, lock_space, workdir, binaries):
    binaries("qemu-img", "qemu-io")
    img = workdir / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(img), "4M")
    r = open_through_extlock(extlockd, lock_space,
                             {"driver": "vmdk", "file": hp.file_child(img)})
    refused(r, "image format vmdk", "cannot be shared through extlock")


def test_local_file_without_direct_accepted(extlockd, lock_space, workdir, binaries):
    """The page-cache refusal is for network and cluster file systems
    (statfs f_type, tests/unit/test-fstype.c); a local file system is
    coherent on its one host and needs no cache.direct=on.  (This machine
    has no kernel NFS client, so the refusal itself is only unit-tested.)"""
    binaries("qemu-img", "qemu-io")
    raw = workdir / "l.raw"
    raw.write_bytes(bytes(MiB))
    accepted(open_through_extlock(extlockd, lock_space, hp.file_child(raw)))
    img = create_qcow2(workdir / "p.qcow2", 4 * MiB, "full")
    accepted(open_through_extlock(extlockd, lock_space, qcow2_child(hp.file_child(img))))


def test_zeroes_written_as_data(extlockd, lock_space, workdir, binaries):
    """Metadata-frozen write-zeroes: a fast-only zero (NO_FALLBACK, qemu-io
    write -z -n) fails with ENOTSUP and changes nothing; a plain one is
    written as data (reads back as zeroes); no zero cluster appears and the
    metadata is byte-identical."""
    binaries("qemu-img", "qemu-io")
    img = create_qcow2(workdir / "p.qcow2", 4 * MiB, "metadata")
    qcow2_io(img, f"write -P 0x55 0 {4 * MiB}")
    ranges = data_ranges(img)
    before = metadata_digest(img, ranges)
    node = extlock_node(qcow2_child(hp.file_child(img)), extlockd.coordinator(),
                        lock_space)
    r = hp.run_qemu_io(node, [f"write -z -n 0 {CLUSTER}"])
    assert "Operation not supported" in r.stdout + r.stderr, r.stdout + r.stderr
    r = hp.run_qemu_io(node, [f"write -z {CLUSTER} {2 * CLUSTER}",
                              f"read -q -P 0x55 0 {CLUSTER}",
                              f"read -q -P 0 {CLUSTER} {2 * CLUSTER}",
                              f"read -q -P 0x55 {3 * CLUSTER} {CLUSTER}"])
    accepted(r)
    assert "Pattern verification failed" not in r.stdout, r.stdout
    assert metadata_digest(img, ranges) == before     # no zero flag set


@pytest.mark.parametrize("option", ["readahead-size", "page-cache-size"])
def test_libnfs_cache_refused(option, nfs_image, extlockd, lock_space, binaries):
    """libnfs's readahead and page cache are per host, like the kernel's:
    refused on the nfs node below extlock (raw here: not only qcow2)."""
    binaries("qemu-io")
    child = dict(nfs_image.child, **{option: 1048576 if option == "readahead-size"
                                     else 16, "node-name": "nfs0"})
    r = open_through_extlock(extlockd, lock_space, {"driver": "raw", "file": child})
    refused(r, "nfs node 'nfs0' uses libnfs's readahead or page cache")
    accepted(open_through_extlock(extlockd, lock_space, nfs_image.child))


# ---------------------------------------------------------------------------
# three hosts on NFS

def nfs_qcow2(nfs, prealloc, size):
    name = f"q-{uuid.uuid4().hex[:10]}.qcow2"
    path = nfs.export_dir / name
    create_qcow2(path, size, prealloc)
    return path


def host_node(path, extlockd, lock_space, n, **extra):
    return extlock_node(qcow2_child(hp.nfs_child(path)), extlockd.coordinator(),
                        lock_space, node_name="xl0", client_id=f"host-{n}", **extra)


def start_hosts(procs, path, extlockd, lock_space, count=3, **extra):
    return [procs.storage_daemon(name=f"host{n}",
                                 blockdevs=[host_node(path, extlockd, lock_space, n,
                                                      **extra)],
                                 exports=[("disk", "xl0", True)])
            for n in range(1, count + 1)]


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_three_hosts_stamped_writes(prealloc, nfs, extlockd, lock_space, procs,
                                    workdir, binaries):
    """Three hosts write stamped 1 MiB extents (4 NFS WRITE RPCs each) and
    read them back, all at once, 12 rounds: every read returns one whole
    write (or an unwritten extent), every extent ends as one whole write,
    qemu-img check is clean and the metadata has not changed."""
    binaries("qemu-img", "qemu-storage-daemon")
    vi = load_verify_image()
    extents, extent_size = 12, MiB
    path = nfs_qcow2(nfs, prealloc, 16 * MiB)
    before = metadata_digest(path)
    layout = vi.Layout(run_id=0x9c0f2, guests=3, extent_size=extent_size,
                       extents=extents, data_offset=MiB, control_offset=0)
    rng = random.Random(1207)
    seq = {g: 0 for g in (1, 2, 3)}
    hosts = start_hosts(procs, path, extlockd, lock_space)
    clients = [NbdClient(h.nbd_path, "disk") for h in hosts]
    torn, reads = [], 0
    try:
        for _round in range(12):
            pending = []
            for g, nb in zip((1, 2, 3), clients):
                for e in rng.sample(range(extents), 3):
                    seq[g] += 1
                    data = b"".join(vi.make_sector(layout, g, seq[g], e, i)
                                    for i in range(layout.nsectors))
                    pending.append((nb, nb.send_write(MiB + e * extent_size, data),
                                    None))
                for e in rng.sample(range(extents), 3):
                    pending.append((nb, nb.send_read(MiB + e * extent_size, extent_size), e))
            for nb, h, e in pending:
                err, data = nb.wait(h, timeout=60)
                assert err == 0, f"request failed with errno {err}"
                if e is not None:
                    reads += 1
                    r = vi.check_extent(layout, data, e)
                    if r["kind"] not in ("complete", "unwritten"):
                        torn.append(r)
        for nb in clients:
            err, _ = nb.wait(nb.send_flush(), timeout=60)
            assert err == 0
    finally:
        for nb in clients:
            nb.close()
    for h in hosts:
        assert h.stop() == 0, h.stderr()
    assert not torn, f"{len(torn)} of {reads} reads torn: {torn[:3]}"

    check_clean(path)
    assert metadata_digest(path) == before, "qcow2 metadata changed"
    raw = workdir / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    layout.max_seq = dict(seq)
    result = vi.verify(raw, layout)
    assert result["mixed"] == 0 and result["corrupt"] == 0, result
    assert result["complete"] == extents, result
    path.unlink()


@pytest.mark.parametrize("protected", [True, False], ids=["extlock", "control-no-extlock"])
def test_discard_and_write_zeroes_keep_metadata(protected, nfs, extlockd, lock_space,
                                                procs, workdir, binaries):
    """Guest discard and write-zeroes through two hosts' extlock nodes:
    write-zeroes reads back as zeroes, discard keeps the data (ignored and
    counted), and the metadata is byte-identical.  The control sends the
    same requests to the qcow2 node without extlock (discard=unmap): qcow2
    then changes its L2 entries (zero flags, freed clusters)."""
    binaries("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = nfs_qcow2(nfs, "metadata", 8 * MiB)
    qcow2_io(path, f"write -P 0x6b 0 {8 * MiB}")
    ranges = data_ranges(path)
    before = metadata_digest(path, ranges)
    if protected:
        hosts = start_hosts(procs, path, extlockd, lock_space, count=2, discard="unmap")
    else:
        hosts = [procs.storage_daemon(name=f"host{n}", blockdevs=[qcow2_child(
            hp.nfs_child(path), **{"node-name": "q0", "discard": "unmap"})],
            exports=[("disk", "q0", True)]) for n in (1, 2)]
    with NbdClient(hosts[0].nbd_path, "disk") as a, NbdClient(hosts[1].nbd_path, "disk") as b:
        for nb, off in ((a, 0), (b, 2 * MiB)):
            err, _ = nb.wait(nb.send_write_zeroes(off, MiB))
            assert err == 0
            err, _ = nb.wait(nb.send_trim(off + MiB, MiB))
            assert err == 0
        if protected:
            # (without extlock, a's cached L2 table would not even show b's
            # zero flags: a reads stale data there)
            assert a.read(2 * MiB, MiB) == bytes(MiB)      # b's zeroes
            assert b.read(MiB, MiB) == bytes([0x6b]) * MiB  # a's discard ignored
            assert a.read(3 * MiB, MiB) == bytes([0x6b]) * MiB
        for nb in (a, b):
            err, _ = nb.wait(nb.send_flush())
            assert err == 0
    if protected:
        for h in hosts:
            stack = h.qmp.execute("query-extent-locks")[0]["stack"]
            assert stack["metadata-frozen"] is True
            assert stack["discards-ignored"] == 1, stack
            assert stack["zero-writes-as-data"] == 1, stack
    for h in hosts:
        assert h.stop() == 0, h.stderr()
    after = metadata_digest(path, ranges)
    if protected:
        assert after == before, "discard/write-zeroes changed the qcow2 metadata"
        check_clean(path)
    else:
        assert after != before, "the control should change the metadata"
    path.unlink()


def open_close_kill_cycles(procs, nodes_for, cycles):
    """`cycles` times: three hosts open the image (qemu-storage-daemon),
    each writes through NBD; then one of them sends 16 more writes and is
    killed with SIGKILL while they are in flight, and the others quit."""
    for c in range(cycles):
        hosts = [procs.storage_daemon(name=f"c{c}h{n}", blockdevs=[nodes_for(n)],
                                      exports=[("disk", "xl0", True)])
                 for n in (1, 2, 3)]
        for n, h in enumerate(hosts):
            with NbdClient(h.nbd_path, "disk") as nb:
                nb.write((n * 4 + c % 4) * CLUSTER, bytes([0x30 + c]) * CLUSTER)
        victim = hosts[c % 3]
        nb = NbdClient(victim.nbd_path, "disk")
        for i in range(16):
            nb.send_write(((c + i) % 64) * CLUSTER, bytes([0x60 + i]) * CLUSTER)
        victim.kill()
        nb.sock.close()
        for h in hosts:
            if h.alive():
                assert h.stop() == 0, h.stderr()


def test_metadata_unchanged_by_opens_closes_and_kills(nfs, extlockd, lock_space, procs,
                                                     binaries):
    """8 cycles of three hosts opening the shared qcow2 read-write,
    writing, one of them killed -9 with writes in flight and the others
    closing it, then one qemu-io open, write and close: the header and
    every other metadata byte stay identical, qemu-img check is clean."""
    binaries("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = nfs_qcow2(nfs, "metadata", 8 * MiB)
    ranges = data_ranges(path)
    before = metadata_digest(path, ranges)
    header = path.read_bytes()[:CLUSTER]

    def node(n):
        return host_node(path, extlockd, lock_space, n)

    open_close_kill_cycles(procs, node, 8)
    r = hp.run_qemu_io(node(4), ["write -q -P 0x77 0 4096", "read -q -P 0x77 0 4096"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert path.read_bytes()[:CLUSTER] == header, "the qcow2 header changed"
    assert metadata_digest(path, ranges) == before, "qcow2 metadata changed"
    check_clean(path)
    path.unlink()


def test_metadata_checker_control_bitmap_without_extlock(nfs, procs, binaries):
    """The control of the test above: a qcow2 image with a persistent
    bitmap, opened read-write by three hosts without extlock (which would
    refuse it) and killed: QEMU marks the bitmap in use at open, and the
    same metadata comparison sees it."""
    binaries("qemu-img", "qemu-storage-daemon")
    path = nfs_qcow2(nfs, "metadata", 8 * MiB)
    qemu_img("bitmap", "--add", str(path), "b0")
    ranges = data_ranges(path)
    before = metadata_digest(path, ranges)

    def node(n):
        return qcow2_child(hp.nfs_child(path), **{"node-name": "xl0"})

    open_close_kill_cycles(procs, node, 1)
    assert metadata_digest(path, ranges) != before
    path.unlink()
