"""tcptrace/btf.py: member offsets from a BTF blob, built here by hand so every case is known."""
import os
import struct

import pytest

from tcptrace.kernel import btf, loader, probes

INT, PTR, ARRAY, STRUCT, UNION, ENUM, TYPEDEF, CONST, FUNC_PROTO, ENUM64 = \
    1, 2, 3, 4, 5, 6, 8, 10, 13, 19


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


def tracepoints(with_rx_sk):
    """A kernel's kfree_skb probe type, `typedef void (*btf_trace_kfree_skb)(void *, struct
    sk_buff *, void *, enum skb_drop_reason[, const struct sock *])`, and its enum."""
    b = Blob()
    b.compound(STRUCT, "sk_buff", 8, [])                          # 1
    b.add(PTR, "", 1)                                             # 2: struct sk_buff *
    b.add(PTR, "", 0)                                             # 3: void *
    vals = [("SKB_DROP_REASON_NOT_SPECIFIED", 2), ("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW", 44)]
    b.add(ENUM, "skb_drop_reason", 4, b"".join(struct.pack("<Ii", b.s(n), v) for n, v in vals),
          vlen=len(vals))                                         # 4
    b.compound(STRUCT, "sock", 8, [])                             # 5
    b.add(CONST, "", 5)                                           # 6: const struct sock
    b.add(PTR, "", 6)                                             # 7: const struct sock *
    params = [3, 2, 3, 4] + ([7] if with_rx_sk else [])
    b.add(FUNC_PROTO, "", 0, b"".join(struct.pack("<II", 0, t) for t in params),
          vlen=len(params))                                       # 8
    b.add(PTR, "", 8)                                             # 9
    b.add(TYPEDEF, "btf_trace_kfree_skb", 9)                      # 10
    big = [("A", 1 << 40)]
    b.add(ENUM64, "wide", 8, b"".join(struct.pack("<III", b.s(n), v & 0xFFFFFFFF, v >> 32)
                                      for n, v in big), vlen=1)   # 11
    return btf.BTF(b.bytes())


def test_tracepoint_arguments_and_enum_values_come_from_btf():
    b = tracepoints(with_rx_sk=True)
    assert b.tracepoint_args("kfree_skb") == ["struct sk_buff *", "void *",
                                             "enum skb_drop_reason", "struct sock *"]
    assert b.tracepoint_args("consume_skb") is None
    assert b.enum("skb_drop_reason")["SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"] == 44
    assert b.enum("wide") == {"A": 1 << 40} and b.enum("nope") is None


def test_typed_tracepoints_load_against_the_probe_types_btf_id(tmp_path):
    """A tp_btf program is loaded against the id of its tracepoint's `btf_trace_<name>`
    typedef, in the running kernel's BTF: none there, no typed programs (nor without the
    offsets the rescue reads)."""
    b = tracepoints(with_rx_sk=True)
    assert b.tracepoint_id("kfree_skb") == 10 and b.tracepoint_id("consume_skb") is None
    path = tmp_path / "vmlinux"
    path.write_bytes(b._data)
    check, ids = probes.typed_tracepoints(str(path))        # no struct sock members in it
    assert check.status == probes.UNSUPPORTED and ids == {}
    assert "recursion rescue" in check.detail


def test_overflow_check_takes_positions_and_number_from_the_running_kernel(tmp_path):
    """The reason's number and the arguments' positions are the kernel's, not a table's; a
    kernel whose kfree_skb names no socket (6.1) cannot count overflows per listener."""
    for with_rx_sk in (True, False):
        path = tmp_path / f"vmlinux-{with_rx_sk}"
        b = tracepoints(with_rx_sk)
        path.write_bytes(b._data)
        check, consts = probes.overflow_args(str(path))
        if with_rx_sk:
            assert check.status == probes.SUPPORTED
            assert consts == {"KFREE_REASON_ARG": 2, "KFREE_SK_ARG": 3,
                              "REASON_LISTEN_OVERFLOW": 44}
        else:
            assert check.status == probes.UNSUPPORTED and consts == {}
            assert "rx_sk" in check.detail and "ListenOverflows" in check.detail


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
    spans = {f"{p}_{end}" for p, _m in probes.RESCUE_SPANS for end in ("LO", "LEN")}
    assert set(offs) == {m for m, *_ in probes.RESCUE_FIELDS} | {"SZ_STACK"} | spans
    assert offs["SZ_STACK"] in (16384, 32768, 65536)
    # each group's one read covers its members, and no more than it must
    sizes = {m: size for m, _s, _mem, size in probes.RESCUE_FIELDS}
    for prefix, members in probes.RESCUE_SPANS:
        lo, n = offs[prefix + "_LO"], offs[prefix + "_LEN"]
        assert lo == min(offs[m] for m in members)
        assert lo + n == max(offs[m] + sizes[m] for m in members) <= lo + probes.SPAN_MAX
    # sock_common comes first in struct sock, inet_sock's own members after struct sock
    b = btf.BTF.load()
    sock_size = b.size(b._structs["sock"])
    assert offs["OFF_FAMILY"] < 64 and offs["OFF_DPORT"] < 64
    assert offs["OFF_SPORT"] >= sock_size and offs["OFF_SADDR"] >= sock_size
    check, ids = probes.sock_id_offsets()
    assert check.status == probes.SUPPORTED, check.detail
    assert ids["OFF_FAMILY"] == offs["OFF_FAMILY"]      # one member, one macro, one value
    cf = loader.cflags(probes.Plan(rescue=True, consts={"rescue": offs}), 64)
    assert "-DTT_RESCUE=1" in cf and f"-DTT_OFF_PROTOCOL={offs['OFF_PROTOCOL']}" in cf
    assert f"-DTT_SZ_STACK={offs['SZ_STACK']}" in cf and "-DTT_TYPED=1" not in cf
    # every hook of raw.c has its probe type, to load its programs as typed tracepoints
    check, ids = probes.typed_tracepoints()
    assert check.status == probes.SUPPORTED, check.detail
    assert ids["TP_INET_SOCK_SET_STATE"] == b.tracepoint_id("inet_sock_set_state")
    assert b.tracepoint_args("inet_sock_set_state")[0] == "struct sock *"
    cf = loader.cflags(probes.Plan(rescue=True, typed=True, consts={"rescue": offs}), 64)
    assert "-DTT_TYPED=1" in cf


def test_members_too_far_apart_for_one_read_turn_the_raw_programs_off():
    offs = {"OFF_DADDR": 0, "OFF_DPORT": 12, "OFF_FAMILY": 16, "OFF_SADDR": 808,
            "OFF_SPORT": 814}
    assert probes._spans(offs, probes.RESCUE_SPANS) == {
        "SPAN_COMMON_LO": 0, "SPAN_COMMON_LEN": 18, "SPAN_INET_LO": 808, "SPAN_INET_LEN": 8}
    offs["OFF_SPORT"] = 808 + probes.SPAN_MAX
    with pytest.raises(btf.BTFError, match="OFF_SADDR, OFF_SPORT lie 34 bytes apart"):
        probes._spans(offs, probes.RESCUE_SPANS)
