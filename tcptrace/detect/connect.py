"""connect and accept: a handshake that completed, and how long the client's took."""
from tcptrace import states as S
from tcptrace.detect.base import Detector
from tcptrace.findings import Accept, Connect


class Handshakes(Detector):
    def established(self, c, ts, old):
        if old == S.SYN_SENT:
            self.tr.conclude(Connect, c, ts, ts - c.opened_ns, c.syn_retrans)
        elif old == S.SYN_RECV:
            # No handshake time: the kernel creates the child socket (LISTEN -> SYN_RECV) only
            # when the final ACK arrives, microseconds before ESTABLISHED; the SYN itself lives
            # in a request sock that no tracepoint reports.
            self.tr.conclude(Accept, c, ts)
