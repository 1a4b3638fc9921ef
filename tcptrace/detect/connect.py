"""connect and accept: a handshake that completed, and how long the client's took. A connect
whose SYNs were retransmitted names the local listener it waited on, when one under pressure
takes its destination (detect/listen.py)."""
from tcptrace import states as S
from tcptrace.detect.base import Detector
from tcptrace.findings import Accept, Connect


class Handshakes(Detector):
    def established(self, c, ts, old):
        if old == S.SYN_SENT:
            listener = self.tr.waited_on(c, ts) if c.syn_retrans else None
            if listener is None:
                self.tr.conclude(Connect, c, ts, ts - c.opened_ns, c.syn_retrans)
            else:       # rare: the general finding, with the one member more
                self.tr.finding(c, "connect", ts, handshake_ns=ts - c.opened_ns,
                                syn_retransmits=c.syn_retrans, listener=listener)
        elif old == S.SYN_RECV:
            # No handshake time: the kernel creates the child socket (LISTEN -> SYN_RECV) only
            # when the final ACK arrives, microseconds before ESTABLISHED; the SYN itself lives
            # in a request sock that no tracepoint reports.
            self.tr.conclude(Accept, c, ts)
