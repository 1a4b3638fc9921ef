"""Struct member offsets of the running kernel, from its BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever kernel headers are installed, which may belong to another kernel
version (on the development machine: 6.1 headers, a 6.18 kernel), so a BPF program must not take
a struct layout from them. Where tcptrace reads a kernel struct (bpf/raw.c, bpf/record.c,
bpf/listen.c), its offsets come from here and are compiled in as constants.

Only what that needs is parsed: the type section is walked once to index named structs, enums
and typedefs, then the few members, enum values or tracepoint arguments asked for are resolved.
The listener facts (bpf/listen.c) read two more things here: which argument of a raw tracepoint
is which (its `btf_trace_<name>` typedef, whose arguments change between kernels), and the values
of kernel enums (drop and reset reasons, numbered differently on every kernel). The format is the kernel's include/uapi/linux/btf.h (stable
ABI): a header, then `struct btf_type` records, each followed by kind-specific data.
"""
import struct

VMLINUX = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
# BTF_KIND_*: bytes of kind-specific data after each btf_type (per entry when vlen-sized).
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)
_FIXED = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}
_PER_VLEN = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class BTFError(Exception):
    """The BTF blob is missing, unreadable, or lacks what was asked for."""


# What slicing and unpacking a blob that lies about its own sizes raises.
_MALFORMED = (struct.error, ValueError, IndexError)


class BTF:
    def __init__(self, data):
        try:
            self._parse(data)
        except _MALFORMED as e:
            raise BTFError(f"BTF blob is malformed: {e}") from e

    def _parse(self, data):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BTFError("not a little-endian BTF blob")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_at = hdr_len + type_off
        self._strs_at = hdr_len + str_off
        self._strs_end = self._strs_at + str_len
        # Type ids start at 1; [0] is void. Each entry: (kind, vlen, kind_flag, size_or_type,
        # offset of its kind-specific data).
        self._types = [None]
        self._structs = {}
        self._named = {_ENUM: {}, _ENUM64: {}, _TYPEDEF: {}}
        pos, end = self._types_at, self._types_at + type_len
        unpack = struct.unpack_from
        types, structs, named = self._types, self._structs, self._named
        while pos < end:
            name_off, info, size_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12
            types.append((kind, vlen, info >> 31, size_type, pos))
            if kind == _STRUCT and name_off:
                structs.setdefault(self._str(name_off), len(types) - 1)
            elif kind in named and name_off:
                named[kind].setdefault(self._str(name_off), len(types) - 1)
            pos += _FIXED.get(kind, 0) + vlen * _PER_VLEN.get(kind, 0)
        if pos != end:
            raise BTFError("BTF type section is malformed")

    @classmethod
    def load(cls, path=VMLINUX):
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BTFError(f"{path}: {e.strerror}") from e

    def _str(self, off):
        start = self._strs_at + off
        end = self._data.index(b"\0", start, self._strs_end)
        return self._data[start:end].decode("ascii", "replace")

    def _resolve(self, tid):
        """Skip typedefs and qualifiers."""
        while self._types[tid][0] in _MODIFIERS:
            tid = self._types[tid][3]
        return tid

    def size(self, tid):
        tid = self._resolve(tid)
        kind, _vlen, _kf, size_type, at = self._types[tid]
        if kind == _ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self._data, at)
            return nelems * self.size(elem)
        if kind == _PTR:
            return 8
        return size_type

    def struct_size(self, name):
        """Size in bytes of struct `name`, or None if BTF has no such struct."""
        tid = self._structs.get(name)
        return None if tid is None else self.size(tid)

    def _members(self, tid):
        kind, vlen, kind_flag, _size, at = self._types[tid]
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, at + 12 * i)
            bitfield = (off >> 24) if kind_flag else 0
            yield (self._str(name_off) if name_off else ""), mtype, (off & 0xFFFFFF if kind_flag else off), bitfield

    def _find(self, tid, name):
        """(bit offset, type id, bitfield size) of member `name` in struct/union `tid`, looking
        through anonymous struct and union members as C does."""
        for mname, mtype, bit_off, bitfield in self._members(tid):
            if mname == name:
                return bit_off, mtype, bitfield
            if not mname:
                inner = self._resolve(mtype)
                if self._types[inner][0] in (_STRUCT, _UNION):
                    hit = self._find(inner, name)
                    if hit:
                        return bit_off + hit[0], hit[1], hit[2]
        return None

    def offset(self, struct_name, path):
        """(byte offset, byte size) of a member given as "a.b.c" from the start of struct
        `struct_name`. Raises BTFError if absent, or if it is a bitfield or not byte-aligned
        (a plain load could not read it)."""
        try:
            return self._offset(struct_name, path)
        except _MALFORMED as e:
            raise BTFError(f"BTF blob is malformed: {e}") from e

    def _offset(self, struct_name, path):
        tid = self._structs.get(struct_name)
        if tid is None:
            raise BTFError(f"struct {struct_name} not in BTF")
        bits = 0
        mtype = tid
        for part in path.split("."):
            cur = self._resolve(mtype)
            if self._types[cur][0] not in (_STRUCT, _UNION):
                raise BTFError(f"{struct_name}.{path}: {part} is not in a struct")
            hit = self._find(cur, part)
            if hit is None:
                raise BTFError(f"struct {struct_name} has no member {path}")
            bit_off, mtype, bitfield = hit
            if bitfield or bit_off % 8:
                raise BTFError(f"{struct_name}.{path} is a bitfield")
            bits += bit_off
        return bits // 8, self.size(mtype)

    def enum(self, name):
        """{member name: value} of `enum name`, or None if BTF has no such enum."""
        try:
            return self._enum(name)
        except _MALFORMED as e:
            raise BTFError(f"BTF blob is malformed: {e}") from e

    def _enum(self, name):
        tid = self._named[_ENUM].get(name) or self._named[_ENUM64].get(name)
        if tid is None:
            return None
        kind, vlen, kind_flag, _size, at = self._types[tid]
        out = {}
        for i in range(vlen):
            if kind == _ENUM:
                name_off, val = struct.unpack_from("<Ii" if kind_flag else "<II", self._data,
                                                   at + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", self._data, at + 12 * i)
                val = hi << 32 | lo
            out[self._str(name_off)] = val
        return out

    def type_name(self, tid):
        """A type as C spells it, qualifiers dropped: "struct sock *", "enum x", "void *"."""
        tid = self._resolve_qualifiers(tid)
        if tid == 0:
            return "void"
        kind, _vlen, _kf, size_type, _at = self._types[tid]
        if kind == _PTR:
            return self.type_name(size_type) + " *"
        name = self._name_of(tid)
        prefix = {_STRUCT: "struct ", _UNION: "union ", _ENUM: "enum ", _ENUM64: "enum ",
                  _FWD: "struct "}.get(kind, "")
        return prefix + name

    def _resolve_qualifiers(self, tid):
        """Skip qualifiers, keep typedefs (a typedef names its type)."""
        while tid and self._types[tid][0] in (_VOLATILE, _CONST, _RESTRICT, _TYPE_TAG):
            tid = self._types[tid][3]
        return tid

    def _name_of(self, tid):
        at = self._types[tid][4] - 12
        return self._str(struct.unpack_from("<I", self._data, at)[0])

    def tracepoint_id(self, name):
        """The BTF id of tracepoint `name`'s probe type (`btf_trace_<name>`), which a typed
        tracepoint program (tp_btf) is loaded against; None if BTF does not describe it."""
        return self._named[_TYPEDEF].get(f"btf_trace_{name}")

    def tracepoint_args(self, name):
        """The arguments of tracepoint `name` as its raw tracepoint programs get them
        (ctx->args[i]), as C type names; None if BTF does not describe it. The kernel declares
        each tracepoint's probe type as `typedef void (*btf_trace_<name>)(void *__data, args...)`."""
        try:
            tid = self._named[_TYPEDEF].get(f"btf_trace_{name}")
            if tid is None:
                return None
            ptr = self._resolve(tid)
            if self._types[ptr][0] != _PTR:
                return None
            proto = self._resolve(self._types[ptr][3])
            kind, vlen, _kf, _ret, at = self._types[proto]
            if kind != _FUNC_PROTO:
                return None
            params = [struct.unpack_from("<II", self._data, at + 8 * i)[1] for i in range(vlen)]
            return [self.type_name(t) for t in params[1:]]      # [0] is void *__data
        except _MALFORMED as e:
            raise BTFError(f"BTF blob is malformed: {e}") from e
