"""The kernel's aggregates of healthy connections (bpf/aggregate.c: `agg`), read on a timer and
turned into a Sample of what grew since the last reading.

The map is cumulative and per CPU; a reading sums each key's CPUs and sends, for each key that
grew, the growth: connections, handshake time summed and per bucket (tcptrace/histogram.py),
life time summed, and the largest handshake so far (a maximum cannot be differenced).
"""
import socket
import struct

from tcptrace import histogram
from tcptrace.kernel.bpfsys import MapScanner, map_info, possible_cpus
from tcptrace.wire import AGG, AGG_OTHER as OTHER, AGG_PASSIVE as PASSIVE, \
    AGG_REMOTE as REMOTE, Sample
_KEY = struct.Struct("<BBH16s16s")
_HEAD = struct.Struct("<4Q")


def _addr(family, raw):
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


class Aggregates:
    def __init__(self, map_fd):
        info = map_info(map_fd)
        if info is None:
            raise OSError("the kernel did not describe the aggregates map")
        _typ, ksize, vsize, self.max_entries = info
        want = _HEAD.size + 4 * histogram.N
        if ksize != _KEY.size or vsize != want:
            raise OSError(f"aggregates map layout {ksize}/{vsize} bytes, expected "
                          f"{_KEY.size}/{want}: bpf/tcptrace.h and the reader disagree")
        self.ncpu = possible_cpus()
        self.stride = (vsize + 7) // 8 * 8
        self._hist = struct.Struct(f"<{histogram.N}I")
        self._scan = MapScanner(map_fd, ksize, self.stride * self.ncpu)
        self._last = {}         # raw key -> (count, hs_sum, hs_max, life_sum, [per bucket])

    def _sum(self, raw):
        """A key's values summed over its CPUs."""
        count = hs_sum = hs_max = life = 0
        hist = None
        for i in range(self.ncpu):
            off = i * self.stride
            c, hs, mx, lf = _HEAD.unpack_from(raw, off)
            if not c:
                continue
            count += c
            hs_sum += hs
            life += lf
            hs_max = max(hs_max, mx)
            h = self._hist.unpack_from(raw, off + _HEAD.size)
            hist = h if hist is None else [a + b for a, b in zip(hist, h)]
        return count, hs_sum, hs_max, life, hist

    def read(self, now_ns):
        """[Sample] of the growth since the last reading ([] if nothing grew)."""
        got = self._scan.items()
        if not got:
            return []
        rows = []
        vs = self.stride * self.ncpu
        for keys, vals in got:
            for i in range(len(keys) // _KEY.size):
                k = keys[i * _KEY.size:(i + 1) * _KEY.size]
                count, hs_sum, hs_max, life, hist = self._sum(vals[i * vs:(i + 1) * vs])
                last = self._last.get(k)
                if last is not None and count == last[0]:
                    continue
                self._last[k] = (count, hs_sum, hs_max, life, hist)
                c0, hs0, _, life0, h0 = last or (0, 0, 0, 0, None)
                buckets = []
                if hist is not None:
                    buckets = [[b, n - (h0[b] if h0 else 0)] for b, n in enumerate(hist)
                               if n - (h0[b] if h0 else 0)]
                family, shape, port, addr, comm = _KEY.unpack(k)
                other = bool(shape & OTHER)
                rows.append([family, shape & (PASSIVE | REMOTE), other,
                             None if other else _addr(family, addr), None if other else port,
                             None if other else comm.split(b"\0", 1)[0].decode(errors="replace"),
                             count - c0, hs_sum - hs0, hs_max, life - life0, buckets])
        return [Sample(now_ns, AGG, 0, {"rows": rows})] if rows else []
