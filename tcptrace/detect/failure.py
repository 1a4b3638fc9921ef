"""refused and failed: connects that never completed, and why.

  refused:     a reset answered our SYN (tcp_receive_reset), or the kernel reported ECONNREFUSED
  timeout:     SYN retransmitted until the kernel gave up (ETIMEDOUT)
  unreachable: an ICMP error (EHOSTUNREACH, ENETUNREACH...), matched by 4-tuple
  cancelled:   the application closed the socket in SYN_SENT: nothing came from the network
  no_local_port: connect() found no free local port for the destination (EADDRNOTAVAIL): the
               socket went SYN_SENT -> CLOSE before a local port was chosen
and connects that failed before any SYN (no route, no source address, denied), seen as
connect()'s return (kprobe or syscall tracepoint), when no transition tells them. One whose SYNs
were retransmitted names the local listener it waited on, when one under pressure takes its
destination (detect/listen.py).

EADDRNOTAVAIL has two causes, told apart by where connect() failed: after CLOSE -> SYN_SENT it
is the search for a local port (inet_hash_connect(): every port of ip_local_port_range is taken
for that destination, TIME_WAIT included), `no_local_port`; before it, no usable source address
(IPv6 source selection), `no_local_address`.
"""
import collections
import errno

from tcptrace import states as S
from tcptrace.detect.base import Detector
from tcptrace.findings import Finding
from tcptrace.lifecycle.conn import ACTIVE, path_names
from tcptrace.lifecycle.rules import CONNECT_TOLD
from tcptrace.wire import COMM_TEXT, F_KPROBE, F_SYSCALL, Kind, addr_str

UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
# Errors seen from connect() before the kernel sent a SYN, and what to call them.
PRE_SYN_REASONS = {errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable",
                   errno.EACCES: "denied", errno.EPERM: "denied",
                   errno.EADDRNOTAVAIL: "no_local_address"}
REREPORT_NS = 10_000_000_000
NO_PORT_PATH = S.SYN_SENT << 4 | S.CLOSE
CALL_NS = 1_000_000_000     # a connect() whose SYN_SENT -> CLOSE came this long before it returned


class FailedConnects(Detector):
    def __init__(self, tracker):
        super().__init__(tracker)
        # (pid, family, raddr, rport) -> (ts, socket) of an attempt that died in SYN_SENT: an
        # unreachable error connect() may still re-report, told from a route failure before a
        # SYN, and the syscall's own return, which may come after the attempt was concluded
        self.failed_syn = collections.OrderedDict()

    def closing(self, c, ts, old):
        if old == S.SYN_SENT:
            key = (c.pid, c.family, c.raddr, c.rport)
            self.failed_syn[key] = (ts, c.skaddr)
            self.failed_syn.move_to_end(key)
            if len(self.failed_syn) > 4096:
                self.failed_syn.popitem(last=False)

    def closed(self, c):
        if c.established_ns is not None or c.role != ACTIVE or c.partial:
            return False
        ts, err = c.closed_ns, c.error
        listener = self.tr.waited_on(c, ts) if c.syn_retrans else None
        waited = {"listener": listener} if listener else {}
        if c.recv_reset_ns is not None or err == errno.ECONNREFUSED:
            self.tr.finding(c, "refused", ts, reason="refused", errno="ECONNREFUSED",
                            syn_retransmits=c.syn_retrans, duration_ns=ts - c.opened_ns,
                            path=path_names[c.path], **waited)
            return True
        if not c.lport and c.path == NO_PORT_PATH and err in (0, errno.EADDRNOTAVAIL):
            # Only inet_hash_connect() failing takes a socket from SYN_SENT to CLOSE before it
            # has a local port (tcp_v{4,6}_connect()'s failure path). connect() returns the
            # errno; no socket error is set, so unless connect()'s return was seen (fact()),
            # it is inferred.
            self.tr.finding(c, "failed", ts, reason="no_local_port", errno="EADDRNOTAVAIL",
                            **({} if err else {"errno_inferred": True}), syn_retransmits=0,
                            duration_ns=ts - c.opened_ns, path=path_names[c.path])
            return True
        if err == errno.ETIMEDOUT:
            reason = "timeout"
        elif err in UNREACHABLE:
            reason = "unreachable"
        elif err:
            reason = "error"
        else:
            reason = "cancelled"      # close() or exit while in SYN_SENT: nothing from the net
        self.tr.finding(c, "failed", ts, reason=reason, errno=S.errno_name(err) if err else None,
                        syn_retransmits=c.syn_retrans, duration_ns=ts - c.opened_ns,
                        path=path_names[c.path], **waited)
        return True

    def fact(self, ev):
        """connect() returned an error before any transition (tcp_v{4,6}_connect's return, or
        the syscall's)."""
        if ev.kind != Kind.CONNECT_RET:
            return
        err = -ev.err if ev.err < 0 else ev.err
        daddr = addr_str(ev.family, ev.daddr)
        if err in CONNECT_TOLD:
            return
        c = self.tr.table.get(ev.skaddr) if ev.skaddr else None
        if c is not None and c.role == ACTIVE and c.closed_ns is not None \
                and c.path & 0xFF == NO_PORT_PATH and 0 <= ev.ts_ns - c.closed_ns < CALL_NS:
            # connect() failed after its CLOSE -> SYN_SENT (the kprobes report every failure of
            # tcp_v{4,6}_connect(), the syscall hook every one it does not know told):
            # the transitions told this attempt, and this is its errno
            if not c.error:
                c.error = err
            return
        if c is not None and c.role == ACTIVE and ev.flags & F_SYSCALL:
            # the syscall's return, for a socket whose attempt is under way or has just ended
            # (kept in the table): that attempt's transitions tell it
            return
        key = (ev.pid, ev.family, daddr, ev.dport)
        died = self.failed_syn.get(key)
        if died is not None and ev.skaddr == died[1] and 0 <= ev.ts_ns - died[0] < CALL_NS:
            return      # the return of an attempt its transitions told and which is concluded
        died = self.failed_syn.pop(key, None)
        if died is not None and err in UNREACHABLE and ev.ts_ns - died[0] < REREPORT_NS:
            return
        reason = PRE_SYN_REASONS.get(err, "error")
        self.tr.emit(Finding("failed", ev.ts_ns, ev.pid, COMM_TEXT[ev.comm], ev.family, None, None,
                             daddr, ev.dport, reason=reason, errno=S.errno_name(err),
                             syn_retransmits=0, before_syn=True,
                             source="kprobe" if ev.flags & F_KPROBE else "syscall"))
