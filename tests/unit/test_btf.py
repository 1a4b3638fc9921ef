"""tcptrace/btf.py: member offsets from a BTF blob, built here by hand so every case is known."""
import os
import struct

import pytest

from tcptrace.kernel import btf, loader, probes

INT, ARRAY, STRUCT, UNION, TYPEDEF = 1, 3, 4, 5, 8


class Blob:
    """A minimal BTF writer: types are appended in id order (the first gets id 1)."""

    def __init__(self):
        self.strs = b"\0"
        self.types = b""

    def s(self, name):
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def add(self, kind, name, size_or_type, extra=b"", vlen=0, kind_flag=0):
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra

    def int_(self, name, size):
        self.add(INT, name, size, struct.pack("<I", size * 8))

    def compound(self, kind, name, size, members, kind_flag=0):
        extra = b"".join(struct.pack("<III", self.s(m), t, off) for m, t, off in members)
        self.add(kind, name, size, extra, vlen=len(members), kind_flag=kind_flag)

    def bytes(self):
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strs))
        return hdr + self.types + self.strs


def sample():
    b = Blob()
    b.int_("int", 4)                                              # 1
    b.int_("unsigned short", 2)                                   # 2
    b.add(TYPEDEF, "__u16", 2)                                    # 3
    b.compound(STRUCT, "", 8, [("daddr", 1, 0), ("saddr", 1, 32)])            # 4: anonymous
    b.compound(UNION, "", 8, [("pair", 1, 0), ("", 4, 0)])                    # 5: anonymous
    b.compound(STRUCT, "common", 16, [("", 5, 0), ("family", 3, 64)])         # 6
    b.int_("u8", 1)                                               # 7
    b.add(ARRAY, "", 0, struct.pack("<III", 7, 1, 16))            # 8: u8[16]
    b.compound(STRUCT, "sock", 48, [("__c", 6, 0), ("proto", 3, 128),
                                    ("flags", 1, (3 << 24) | 160), ("addr", 8, 192)],
               kind_flag=1)                                       # 9: flags is a 3-bit field
    return btf.BTF(b.bytes())


def test_members_through_anonymous_unions_and_typedefs():
    b = sample()
    assert b.offset("sock", "__c.daddr") == (0, 4)
    assert b.offset("sock", "__c.saddr") == (4, 4)
    assert b.offset("sock", "__c.pair") == (0, 4)
    assert b.offset("sock", "__c.family") == (8, 2)       # size through the typedef
    assert b.offset("sock", "proto") == (16, 2)
    assert b.offset("sock", "addr") == (24, 16)          # array: 16 x u8
    assert b.offset("common", "family") == (8, 2)
    assert b.struct_size("sock") == 48 and b.struct_size("nope") is None


@pytest.mark.parametrize("struct_,path,why", [
    ("sock", "flags", "bitfield"),
    ("sock", "nope", "no member"),
    ("sock", "proto.x", "not in a struct"),
    ("socket", "proto", "not in BTF"),
])
def test_what_cannot_be_read_plainly_is_refused(struct_, path, why):
    with pytest.raises(btf.BTFError, match=why):
        sample().offset(struct_, path)


def test_malformed_blobs_are_refused():
    good = Blob()
    good.int_("int", 4)
    data = good.bytes()
    with pytest.raises(btf.BTFError, match="little-endian"):
        btf.BTF(b"\0\0" + data[2:])
    with pytest.raises(btf.BTFError, match="too short"):
        btf.BTF(data[:10])
    # type section one byte shorter than its types
    bad = bytearray(data)
    struct.pack_into("<I", bad, 12, len(good.types) - 1)
    with pytest.raises(btf.BTFError, match="malformed"):
        btf.BTF(bytes(bad))
    # type section said to run past the end of the blob: a clear error, not struct.error
    bad = bytearray(data)
    struct.pack_into("<I", bad, 12, len(good.types) + 100)
    with pytest.raises(btf.BTFError, match="malformed"):
        btf.BTF(bytes(bad))
    with pytest.raises(btf.BTFError, match="No such file"):
        btf.BTF.load("/nonexistent/vmlinux")


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="kernel without BTF")
def test_running_kernel_has_every_member_the_rescue_reads():
    check, offs = probes.rescue_offsets()
    assert check.status == probes.SUPPORTED, check.detail
    assert set(offs) == {m for m, *_ in probes.RESCUE_FIELDS} | {"SZ_STACK"}
    assert offs["SZ_STACK"] in (16384, 32768, 65536)
    # sock_common comes first in struct sock, inet_sock's own members after struct sock
    b = btf.BTF.load()
    sock_size = b.size(b._structs["sock"])
    assert offs["FAMILY"] < 64 and offs["DPORT"] < 64
    assert offs["SPORT"] >= sock_size and offs["SADDR"] >= sock_size
    cf = loader.cflags(probes.Plan(rescue=offs), 64)
    assert "-DTT_RESCUE=1" in cf and f"-DTT_OFF_PROTOCOL={offs['PROTOCOL']}" in cf
    assert f"-DTT_SZ_STACK={offs['SZ_STACK']}" in cf
