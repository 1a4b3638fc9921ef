"""TCP states (include/net/tcp_states.h), address families and which listener takes a
connection, and the errno names findings carry."""
import errno as _errno

ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, \
    LISTEN, CLOSING, NEW_SYN_RECV = range(1, 13)

NAMES = {
    ESTABLISHED: "ESTABLISHED", SYN_SENT: "SYN_SENT", SYN_RECV: "SYN_RECV",
    FIN_WAIT1: "FIN_WAIT1", FIN_WAIT2: "FIN_WAIT2", TIME_WAIT: "TIME_WAIT", CLOSE: "CLOSE",
    CLOSE_WAIT: "CLOSE_WAIT", LAST_ACK: "LAST_ACK", LISTEN: "LISTEN", CLOSING: "CLOSING",
    NEW_SYN_RECV: "NEW_SYN_RECV",
}
BY_NAME = {v: k for k, v in NAMES.items()}

# Half-closed states a socket can linger in; each names who owes the next move.
HALF_CLOSED = {
    CLOSE_WAIT: "local app never called close() after the peer's FIN",
    FIN_WAIT1: "the peer has not acknowledged our FIN",
    FIN_WAIT2: "the peer's app has not closed (no FIN from it)",
    LAST_ACK: "the peer has not acknowledged our FIN",
    CLOSING: "simultaneous close: the peer has not ACKed our FIN",
}

# /proc/net/tcp "st" column -> state (same numbering).
AF_INET, AF_INET6 = 2, 10
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
# The address a listener binds to take every address of its family.
WILDCARD = {AF_INET: "0.0.0.0", AF_INET6: "::"}


def owning_listener(family, laddr, lport, keys):
    """The listener key (family, laddr, lport) among `keys` that takes a connection to laddr:
    the one bound to that address, else one bound to the wildcard address of the family, else
    (IPv4) an IPv6 wildcard listener, which takes IPv4 too unless IPV6_V6ONLY; None if none.
    The kernel's order: a listener bound to the address outscores a wildcard one."""
    for key in ((family, laddr, lport), (family, WILDCARD.get(family), lport),
                (AF_INET6, "::", lport) if family == AF_INET else None):
        if key in keys:
            return key
    return None


def name(state):
    return NAMES.get(state, f"STATE_{state}")


def errno_name(err):
    """Name of a positive or negative errno, e.g. 111 -> 'ECONNREFUSED'."""
    if err is None:
        return None
    return _errno.errorcode.get(abs(err), f"E{abs(err)}")
