"""host/diag.py's requests and replies against a netlink peer that speaks the uapi: one
TCPDIAG_GETSOCK request for both families where the kernel takes it, one request per family
where it refuses it, and the same sockets either way. tests/kernel/test_host.py holds it
against the running kernel."""
import errno
import socket
import struct

import pytest

from tcptrace.host import diag
from tcptrace.host.diag import _MSG, _NLMSG, Diag, DiagSock


def sock(family, lport, state=6):
    addr = "10.0.0.1" if family == socket.AF_INET else "fd00::1"
    return DiagSock(family, state, 0, 0, addr, lport, addr, 80, 1000, 0, 0, 0, 0, lport)


SOCKS = [sock(socket.AF_INET, 40000), sock(socket.AF_INET6, 40001), sock(socket.AF_INET, 40002),
         sock(socket.AF_INET6, 40003), sock(socket.AF_INET, 40004)]


def msg(s):
    raw = lambda a: socket.inet_pton(s.family, a).ljust(16, b"\0")
    return _MSG.pack(s.family, s.state, s.timer, s.retrans, s.lport.to_bytes(2, "big"),
                     s.rport.to_bytes(2, "big"), raw(s.laddr), raw(s.raddr), 0,
                     s.cookie.to_bytes(8, "little"), s.expires_ms, s.rqueue, s.wqueue, s.uid,
                     s.inode)


def nl(typ, seq, body):
    return _NLMSG.pack(_NLMSG.size + len(body), typ, 2, seq, 0) + body


class Peer:
    """A netlink socket's far end: answers each dump request from SOCKS, `per_read` messages
    a read (the families interleaved, as the kernel's one walk brings them), the DONE in a read
    of its own or after the last messages, the third socket with an attribute (as a full
    socket's message has: then its read is parsed message by message); or refuses
    TCPDIAG_GETSOCK as a kernel without it does."""

    def __init__(self, takes_both, per_read=2, done_apart=True):
        self.takes_both, self.per_read, self.done_apart = takes_both, per_read, done_apart
        self.requests = []          # (type, family) asked
        self.reads = []

    def sendall(self, data):
        _len, typ, _flags, seq, _pid = _NLMSG.unpack_from(data)
        family = data[_NLMSG.size]
        self.requests.append((typ, family))
        if typ == diag.TCPDIAG_GETSOCK and not self.takes_both:
            self.reads.append(nl(diag.NLMSG_ERROR, seq, struct.pack("=i", -errno.EOPNOTSUPP)
                                 + data[:_NLMSG.size]))
            return
        mine = [s for s in SOCKS if typ == diag.TCPDIAG_GETSOCK or s.family == family]
        attr = struct.pack("=HHB3x", 5, 8, 0)       # INET_DIAG_SHUTDOWN, padded
        for i in range(0, len(mine), self.per_read):
            self.reads.append(b"".join(nl(typ, seq, msg(s) + (attr if s is SOCKS[2] else b""))
                                       for s in mine[i:i + self.per_read]))
        done = nl(diag.NLMSG_DONE, seq, b"\0\0\0\0")
        if self.done_apart:
            self.reads.append(done)
        else:
            self.reads[-1] += done

    def recv_into(self, buf):
        data = self.reads.pop(0)
        buf[:len(data)] = data
        return len(data)

    def close(self):
        pass


@pytest.mark.parametrize("per_read,done_apart", [(2, True), (1, False), (5, False)])
@pytest.mark.parametrize("takes_both", [True, False])
def test_both_families_come_from_one_request_where_the_kernel_takes_it(takes_both, per_read,
                                                                       done_apart):
    d = Diag()
    d.sock.close()
    d.sock = peer = Peer(takes_both, per_read, done_apart)
    assert sorted(d.dump(["TIME_WAIT"])) == sorted(SOCKS)
    both = (diag.TCPDIAG_GETSOCK, 0)
    per_family = [(diag.SOCK_DIAG_BY_FAMILY, socket.AF_INET),
                  (diag.SOCK_DIAG_BY_FAMILY, socket.AF_INET6)]
    assert peer.requests == ([both] if takes_both else [both] + per_family)
    assert d.both is takes_both
    # each chunk is one family's: a reader picks its tables per chunk, not per socket
    for fam, buf, offsets in d.raw(["TIME_WAIT"]):
        assert {buf[o] for o in offsets} == {fam}
    # a refusal is remembered: no second try; one family is asked as itself
    assert peer.requests[-1] == (both if takes_both else per_family[1])
    d.dump(["TIME_WAIT"], families=(socket.AF_INET6,))
    assert peer.requests[-1] == per_family[1]
    assert not peer.reads


def test_any_other_error_is_raised():
    d = Diag()
    d.sock.close()
    d.sock = peer = Peer(False)
    peer.sendall = lambda data: peer.reads.append(
        nl(diag.NLMSG_ERROR, d._seq, struct.pack("=i", -errno.EPERM)))
    with pytest.raises(OSError) as e:
        d.dump(["TIME_WAIT"])
    assert e.value.errno == errno.EPERM and d.both is True
