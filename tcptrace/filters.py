"""Which connections the user asked about.

Family and port filters also go to the kernel (tcptrace/kernel/loader.py writes them into BPF
maps), so unwanted sockets cost no delivery (except tcp_send_reset records, whose raw tracepoint carries
only the sock pointer: one record per reset, dropped by the tracker). pid and comm cannot: most transitions run in softirq, where the
current task is a bystander, so they are matched here against the attributed owner. Addresses
(CIDR) are matched here too. Applying every filter again in user space keeps replay and live runs
identical.
"""
import ipaddress
from dataclasses import dataclass

from tcptrace import states


# Findings about the tracer itself rather than a connection: they pass every filter, since
# what was lost or evicted may have been a wanted connection. So do a namespace's TIME_WAIT
# readings: they are about every connection of it.
ABOUT_THE_TRACER = ("lost", "evicted", "time_wait", "time_wait_overflow")
# What --only never hides: what the tracer could not see or keep.
NEVER_HIDDEN = ("lost", "evicted")


@dataclass
class Filter:
    pids: frozenset = frozenset()
    comms: frozenset = frozenset()
    ports: frozenset = frozenset()
    laddrs: tuple = ()
    raddrs: tuple = ()
    families: tuple = ()          # AF_INET / AF_INET6; empty = both
    types: frozenset = frozenset()  # finding types (--only); empty = all

    def empty(self):
        return not (self.pids or self.comms or self.ports or self.laddrs or self.raddrs
                    or self.families or self.types)

    def per_connection(self):
        """Does it match on what a connection's own findings say (owner, addresses)? Then
        every connection must come to user space: none can be folded."""
        return bool(self.pids or self.comms or self.laddrs or self.raddrs)

    def kernel_families(self):
        return self.families

    def match(self, f):
        t = f.type
        if self.types and t not in self.types and t not in NEVER_HIDDEN:
            return False
        if t in ABOUT_THE_TRACER:
            return True
        if t == "aggregate":
            # Folded connections, for report and metrics (Options.fold): the kernel applied the
            # family and port filters, and no other filter folds
            return True
        if self.families and f.family not in self.families:
            return False
        if self.pids and f.pid not in self.pids:
            return False
        if self.comms and f.comm not in self.comms:
            return False
        if self.ports and f.lport not in self.ports and f.rport not in self.ports:
            return False
        if self.laddrs and not _in(f.laddr, self.laddrs):
            return False
        if self.raddrs and not _in(f.raddr, self.raddrs):
            return False
        return True


def _in(addr, nets):
    if not addr:
        return False
    try:
        a = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(a.version == n.version and a in n for n in nets)


def parse_net(text):
    """'10.0.0.0/8', '::1', '192.0.2.7' -> ip_network; ValueError with a clear message."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an address or CIDR: {text!r}") from None


def build(pid=(), comm=(), port=(), laddr=(), raddr=(), ipv4=False, ipv6=False, only=()):
    fams = ()
    if ipv4 and not ipv6:
        fams = (states.AF_INET,)
    elif ipv6 and not ipv4:
        fams = (states.AF_INET6,)
    return Filter(pids=frozenset(pid), comms=frozenset(comm), ports=frozenset(port),
                  laddrs=tuple(laddr), raddrs=tuple(raddr), families=fams,
                  types=frozenset(only))
