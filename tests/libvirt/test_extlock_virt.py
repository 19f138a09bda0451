"""extlock-virt: the conversion, and clear errors for bad inputs.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Runs the real binary on XML files; needs neither root nor libvirtd (the
meson test 'extlock-virt' runs this file).  That libvirt really numbers
its nodes as extlock-virt computes is checked against libvirtd in
test_libvirt.py::test_node_names_match_libvirt.
"""

import json
import subprocess
import xml.etree.ElementTree as ET

import pytest

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
Q = "{" + QEMU_NS + "}"

SHARED = """<disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nfs' name='/export/shared.raw'><host name='127.0.0.1'/></source>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>"""


def domain(disks=SHARED, extra="", dtype="kvm", head=""):
    return f"""<domain type='{dtype}'{head}>
  <name>d1</name>
  <memory unit='MiB'>128</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/local/bin/qemu-system-x86_64</emulator>
    {disks}
  </devices>
  {extra}
</domain>
"""


def disk(dev, bus=None, fmt="raw", src=True, device="disk", inner=""):
    b = f" bus='{bus}'" if bus else ""
    s = f"<source file='/img/{dev}'/>" if src else ""
    t = f"<driver name='qemu' type='{fmt}'/>" if fmt else ""
    return (f"<disk type='file' device='{device}'>{t}{s}"
            f"<target dev='{dev}'{b}/>{inner}</disk>")


def shared(dev="vdb", bus="virtio"):
    return disk(dev, bus, inner="<shareable/>")


BASE_ARGS = ["--disk", "vdb", "--lock-space", "cluster-disk",
             "--coordinator", "unix:/run/extlock/extlockd.sock"]


def run(tool, xml, *args, base=True):
    argv = [tool] + (BASE_ARGS if base else []) + list(args) + ["-"]
    return subprocess.run(argv, input=xml, capture_output=True, text=True)


def converted(tool, xml, *args):
    res = run(tool, xml, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return ET.fromstring(res.stdout)


def blockdevs(root):
    args = [a.get("value") for a in root.iter(Q + "arg")]
    return [json.loads(args[i + 1]) for i, a in enumerate(args)
            if a == "-blockdev"]


def test_conversion(extlock_virt):
    root = converted(extlock_virt, domain(),
                     "--client-id", "host-a/vdb", "--lease-time", "5000",
                     "--on-lease-loss", "error", "-o", "granularity=65536",
                     "-o", "lock-cache=off")
    (bd,) = blockdevs(root)
    assert bd == {"driver": "extlock", "node-name": "xl-vdb",
                  "file": "libvirt-1-format", "lock-space": "cluster-disk",
                  "coordinator": {"type": "unix",
                                  "path": "/run/extlock/extlockd.sock"},
                  "client-id": "host-a/vdb", "lease-time": 5000,
                  "on-lease-loss": "error", "granularity": 65536,
                  "lock-cache": False}
    d = root.find("devices/disk")
    assert d.find("alias").get("name") == "ua-extlock-vdb"
    dev = root.find(f"{Q}override/{Q}device")
    assert dev.get("alias") == "ua-extlock-vdb"
    prop = dev.find(f"{Q}frontend/{Q}property")
    assert prop.attrib == {"name": "drive", "type": "string", "value": "xl-vdb"}


def test_tls_and_tcp(extlock_virt):
    res = subprocess.run(
        [extlock_virt, "-d", "vdb", "-l", "s", "--coordinator", "tcp:[::1]:7890",
         "--tls-creds-dir", "/etc/pki/qemu-extlock",
         "--tls-hostname", "coord.example", "-"],
        input=domain(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    root = ET.fromstring(res.stdout)
    args = [a.get("value") for a in root.iter(Q + "arg")]
    assert args[0] == "-object"
    assert json.loads(args[1]) == {"qom-type": "tls-creds-x509",
                                   "id": "xl-tls-vdb",
                                   "dir": "/etc/pki/qemu-extlock",
                                   "endpoint": "client"}
    (bd,) = blockdevs(root)
    assert bd["coordinator"] == {"type": "inet", "host": "::1", "port": "7890"}
    assert bd["tls-creds"] == "xl-tls-vdb"
    assert bd["tls-hostname"] == "coord.example"


def test_coordinator_list(extlock_virt):
    """Several coordinators (an HA group): a comma list and repeated
    options make one list, in order, as the driver's 'coordinators'."""
    res = subprocess.run(
        [extlock_virt, "-d", "vdb", "-l", "s", "-c", "tcp:a:7890,tcp:[::1]:7891",
         "--coordinator", "unix:/run/x.sock", "-"],
        input=domain(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (bd,) = blockdevs(ET.fromstring(res.stdout))
    assert "coordinator" not in bd
    assert bd["coordinators"] == [
        {"type": "inet", "host": "a", "port": "7890"},
        {"type": "inet", "host": "::1", "port": "7891"},
        {"type": "unix", "path": "/run/x.sock"}]
    # one address stays the plain 'coordinator' (any driver takes it)
    (bd,) = blockdevs(converted(extlock_virt, domain()))
    assert "coordinators" not in bd
    assert bd["coordinator"] == {"type": "unix",
                                 "path": "/run/extlock/extlockd.sock"}


def test_tls_psk(extlock_virt):
    res = subprocess.run(
        [extlock_virt, "-d", "vdb", "-l", "s", "-c", "tcp:coord:7890",
         "--tls-creds-dir", "/etc/pki/psk", "--tls-psk-user", "host-a", "-"],
        input=domain(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    root = ET.fromstring(res.stdout)
    args = [a.get("value") for a in root.iter(Q + "arg")]
    obj = json.loads(args[1])
    assert obj["qom-type"] == "tls-creds-psk" and obj["username"] == "host-a"
    (bd,) = blockdevs(root)
    assert bd["coordinator"] == {"type": "inet", "host": "coord", "port": "7890"}
    assert bd["tls-creds"] == "xl-tls-vdb"


def test_keeps_existing_qemu_elements(extlock_virt):
    extra = ("<q:commandline><q:arg value='-L'/><q:arg value='/usr/share/seabios'/>"
             "</q:commandline>")
    root = converted(extlock_virt,
                     domain(extra=extra, head=f" xmlns:q='{QEMU_NS}'"))
    args = [a.get("value") for a in root.iter(Q + "arg")]
    assert args[:2] == ["-L", "/usr/share/seabios"]
    assert args[2] == "-blockdev"
    assert len(root.findall(Q + "commandline")) == 1


def test_user_alias_is_reused(extlock_virt):
    xml = domain(disks=disk("vdb", inner="<shareable/><alias name='ua-data'/>"))
    root = converted(extlock_virt, xml)
    assert root.find(f"{Q}override/{Q}device").get("alias") == "ua-data"
    assert len(root.findall("devices/disk/alias")) == 1


# libvirt 9.0's node numbers, measured with virsh domxml-to-native (and
# checked again against libvirtd by test_libvirt.py)
NODE_CASES = {
    "only": ([shared()], "libvirt-1-format"),
    "after vda": ([disk("vda"), shared()], "libvirt-1-format"),
    "before vdc": ([disk("vda"), shared(), disk("vdc")], "libvirt-2-format"),
    "sorted by target": ([shared(), disk("vda")], "libvirt-1-format"),
    "cdrom without media": ([disk("vda"), shared(),
                             disk("hdc", "ide", src=False, device="cdrom")],
                            "libvirt-2-format"),
    "scsi first": ([disk("sda", "scsi"), shared(), disk("vda")],
                   "libvirt-1-format"),
    "backing chain after": ([shared(), disk("vdc", fmt="qcow2", inner=(
        "<backingStore type='file'><format type='raw'/>"
        "<source file='/img/base'/><backingStore/></backingStore>"))],
        "libvirt-3-format"),
    "qcow2 without backing after": ([shared(), disk("vdc", fmt="qcow2",
                                                    inner="<backingStore/>")],
                                    "libvirt-2-format"),
}


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_libvirt_node_name(extlock_virt, case):
    disks, node = NODE_CASES[case]
    root = converted(extlock_virt, domain(disks="\n".join(disks)))
    assert blockdevs(root)[0]["file"] == node


@pytest.mark.parametrize("version,node", [
    ("9.0.0", "libvirt-1-format"), ("9.9", "libvirt-1-format"),
    ("9.10.0", "libvirt-1-storage"), ("11.3.0", "libvirt-1-storage"),
    ("10.0", "libvirt-1-storage")])
def test_libvirt_version(extlock_virt, version, node):
    """libvirt >= 9.10 attaches a raw disk's device to its storage node
    (no raw format node); a qcow2 disk keeps its format node."""
    root = converted(extlock_virt, domain(), "--libvirt-version", version)
    assert blockdevs(root)[0]["file"] == node
    xml = domain(disks=disk("vdb", fmt="qcow2", inner="<shareable/>"))
    root = converted(extlock_virt, xml, "--preallocated",
                     "--libvirt-version", version)
    assert blockdevs(root)[0]["file"] == "libvirt-1-format"


def test_node_option(extlock_virt):
    xml = domain(disks="\n".join([shared(), disk("vdc", fmt="qcow2")]))
    root = converted(extlock_virt, xml, "--node", "libvirt-7-format")
    assert blockdevs(root)[0]["file"] == "libvirt-7-format"


BAD_XML = {
    "not xml": ("this is not XML", "-: not well-formed XML"),
    "not a domain": ("<network><name>n</name></network>",
                     "not a libvirt domain XML (the root element is <network>"),
    "not qemu": (domain(dtype="xen"), "domain type 'xen': extlock needs a QEMU domain"),
    "no such disk": (domain(disks=disk("vda")),
                     "no disk with target 'vdb' (the domain's disks: vda)"),
    "cdrom": (domain(disks=disk("vdb", device="cdrom", inner="<shareable/>")),
              "disk vdb is a cdrom: only device='disk'"),
    "not shareable": (domain(disks=disk("vdb")),
                      "disk vdb is not <shareable/>: add <shareable/>"),
    "qcow2": (domain(disks=disk("vdb", fmt="qcow2", inner="<shareable/>")),
              "disk vdb has format 'qcow2', not raw: a qcow2 image that grows "
              "allocates clusters and writes metadata that no extent lock "
              "covers, so it must be preallocated"),
    "no format": (domain(disks=disk("vdb", fmt=None, inner="<shareable/>")),
                  "disk vdb has no <driver type='...'/>: say type='raw'"),
    "no source": (domain(disks=disk("vdb", src=False, inner="<shareable/>")),
                  "disk vdb has no <source>"),
    "backing file": (domain(disks=disk("vdb", inner=(
        "<shareable/><backingStore type='file'><format type='raw'/>"
        "<source file='/b'/></backingStore>"))),
        "disk vdb has a backing file"),
    "running domain": (domain(disks=disk("vdb", inner=(
        "<shareable/><alias name='virtio-disk1'/>"))),
        "has the alias 'virtio-disk1' of a running domain: convert the "
        "inactive XML (virsh dumpxml --inactive)"),
    "unknown chain after": (domain(disks="\n".join(
        [shared(), disk("vdc", fmt="qcow2")])),
        "cannot tell libvirt's node name for the disk: disk vdc after it is "
        "not raw and has no <backingStore>"),
    "iscsi": (domain(disks="""<disk type='network' device='disk'>
        <driver name='qemu' type='raw'/><source protocol='iscsi' name='iqn/1'>
        <host name='h'/></source><target dev='vdb'/><shareable/></disk>"""),
        "protocol 'iscsi': extlock-virt handles nfs"),
}


@pytest.mark.parametrize("case", list(BAD_XML))
def test_bad_xml(extlock_virt, case, tmp_path):
    xml, message = BAD_XML[case]
    out = tmp_path / "out.xml"
    res = run(extlock_virt, xml, "--output", str(out))
    assert res.returncode == 1, res.stdout
    assert message in res.stderr, res.stderr
    assert res.stdout == ""
    assert not out.exists()


def test_converted_twice(extlock_virt, tmp_path):
    once = run(extlock_virt, domain()).stdout
    res = run(extlock_virt, once)
    assert res.returncode == 1
    assert "disk vdb already has an extlock node" in res.stderr
    assert "converted before" in res.stderr


def test_preallocated_qcow2_accepted(extlock_virt):
    xml = domain(disks=disk("vdb", fmt="qcow2", inner="<shareable/>"))
    root = converted(extlock_virt, xml, "--preallocated")
    assert blockdevs(root)[0]["file"] == "libvirt-1-format"


BAD_OPTIONS = {
    "no disk": ([], "--disk is required"),
    "no lock-space": (["--disk", "vdb", "-c", "unix:/s"], "--lock-space is required"),
    "no coordinator": (["--disk", "vdb", "-l", "x"], "--coordinator is required"),
    "bad coordinator": (["--disk", "vdb", "-l", "x", "-c", "coord:7890"],
                        "--coordinator 'coord:7890': expected unix:PATH or "
                        "tcp:HOST:PORT"),
    "bad port": (["--disk", "vdb", "-l", "x", "-c", "tcp:h:http"],
                 "expected unix:PATH or tcp:HOST:PORT"),
    "empty in list": (["--disk", "vdb", "-l", "x", "-c", "tcp:a:1,,tcp:b:1"],
                      "--coordinator 'tcp:a:1,,tcp:b:1': an empty address in "
                      "the list"),
    "empty coordinator": (["--disk", "vdb", "-l", "x", "-c", ""],
                          "--coordinator '': an empty address"),
    "trailing comma": (["--disk", "vdb", "-l", "x", "-c", "unix:/s,"],
                       "an empty address in the list"),
    "bad in list": (["--disk", "vdb", "-l", "x", "-c", "tcp:a:1,b:2"],
                    "--coordinator 'b:2': expected unix:PATH or "
                    "tcp:HOST:PORT"),
    "duplicate": (["--disk", "vdb", "-l", "x", "-c", "tcp:a:1", "-c",
                   "tcp:b:1,tcp:a:1"], "--coordinator 'tcp:a:1' given twice"),
    "tls-hostname alone": (BASE_ARGS + ["--tls-hostname", "h"],
                           "--tls-hostname needs --tls-creds-dir"),
    "lease-time": (BASE_ARGS + ["--lease-time", "5"],
                   "--lease-time must be between 100 and 3600000 ms"),
    "on-lease-loss": (BASE_ARGS + ["--on-lease-loss", "panic"],
                      "--on-lease-loss must be 'queue' or 'error'"),
    "option": (BASE_ARGS + ["-o", "granularity"],
               "--option 'granularity': expected KEY=VALUE"),
    "disk name": (["--disk", "vd b", "-l", "x", "-c", "unix:/s"],
                  "--disk 'vd b': not a disk target name"),
    "unknown option": (BASE_ARGS + ["--frobnicate"], "Unknown option --frobnicate"),
    "libvirt version": (BASE_ARGS + ["--libvirt-version", "11.3x"],
                        "--libvirt-version '11.3x': expected MAJOR.MINOR"),
    "libvirt version major": (BASE_ARGS + ["--libvirt-version", "11"],
                              "--libvirt-version '11': expected MAJOR.MINOR"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options(extlock_virt, case):
    args, message = BAD_OPTIONS[case]
    res = subprocess.run([extlock_virt] + args + ["-"], input=domain(),
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stdout
    assert message in res.stderr, res.stderr
    assert "Try 'extlock-virt --help'" in res.stderr
    assert res.stdout == ""


def test_missing_file(extlock_virt, tmp_path):
    res = subprocess.run([extlock_virt] + BASE_ARGS + [str(tmp_path / "nope.xml")],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "nope.xml: No such file or directory" in res.stderr
