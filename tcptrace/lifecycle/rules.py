"""What a transition means, stated once for both sides of the wire.

The kernel side groups a socket's steps by these rules (bpf/: it starts a new record at an
opening step, and names a record's task by its owner's steps) and the lifecycle reads them the
same way; the loader hands them to the BPF compiler as macros (`cflags()`), so the C code has
no copy of its own, and tests/streams.py models the kernel with them.
"""
import errno

from tcptrace import states as S

# A process makes these itself (connect(), listen(), close() or shutdown(), close() after the
# peer's FIN): the task current at such a step is the socket's owner. Every other transition
# runs in softirq, on whatever task was interrupted.
OWNER_STEPS = ((S.CLOSE, S.SYN_SENT), (S.CLOSE, S.LISTEN), (S.ESTABLISHED, S.FIN_WAIT1),
               (S.CLOSE_WAIT, S.LAST_ACK))
# A new generation of the socket address starts: connect(), listen(), a listener's child.
OPENING_STEPS = ((S.CLOSE, S.SYN_SENT), (S.CLOSE, S.LISTEN), (S.LISTEN, S.SYN_RECV))
# States a socket may rest in for long, or leaves for good: the kernel sends what is pending.
SEND_AT = (S.ESTABLISHED, S.CLOSE, S.LISTEN)

# What connect() returns that is no failure of an attempt it made: it is under way (EINPROGRESS,
# EALREADY), done (EISCONN), interrupted while waiting, to go on or be restarted (EINTR and the
# kernel's ERESTART* codes, which its syscall exit shows before signal handling), or the outcome
# of the attempt's SYN, which only the network gives and the transitions tell (the rest). Event
# loops call connect() again to learn a non-blocking connect's outcome and get these.
ERESTART = (512, 513, 514, 516)     # ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND,
                                    # ERESTART_RESTARTBLOCK (include/linux/errno.h)
CONNECT_TOLD = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EISCONN, errno.EINTR,
                          *ERESTART, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET,
                          errno.ECONNABORTED})

# The same as matrix cells (old << 4 | new), for the lifecycle's per-step lookups.
OWNER_CELLS = frozenset(o << 4 | n for o, n in OWNER_STEPS)
OPENING_CELLS = frozenset(o << 4 | n for o, n in OPENING_STEPS)


def _pairs_macro(name, pairs):
    cond = " || ".join(f"((o) == {o} && (n) == {n})" for o, n in pairs)
    return f"-D{name}(o,n)=({cond})"


def cflags():
    """The rules as the macros bpf/ uses: TT_OWNER_STEP(o,n), TT_OPENING_STEP(o,n),
    TT_SEND_AT(n), TT_CONNECT_TOLD(e)."""
    send = " || ".join(f"(n) == {n}" for n in SEND_AT)
    told = " || ".join(f"(e) == {e}" for e in sorted(CONNECT_TOLD))
    return [_pairs_macro("TT_OWNER_STEP", OWNER_STEPS),
            _pairs_macro("TT_OPENING_STEP", OPENING_STEPS), f"-DTT_SEND_AT(n)=({send})",
            f"-DTT_CONNECT_TOLD(e)=({told})"]
