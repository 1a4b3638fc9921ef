"""The connections the lifecycle knows, and how to find one.

A socket's address is reused as soon as the socket is freed, and the local port is still 0 at
CLOSE -> SYN_SENT, so a connection is keyed by its socket address and lives for one generation
of it (from CLOSE -> SYN_SENT, LISTEN -> SYN_RECV or CLOSE -> LISTEN to its -> CLOSE), never by
its 4-tuple. Two secondary indexes: by 4-tuple, only while a connect is unresolved (error
reports carry no socket address), and the sockets seeded from /proc that no event has claimed.
And who listens where, which names the owner of an accepted connection.
"""
from tcptrace import states as S
from tcptrace.cache import Memo
from tcptrace.lifecycle.conn import LISTENER, Conn
from tcptrace.states import owning_listener

# Closed listeners remembered (ConnTable.accepted_by): per namespace, and namespaces
MAX_CLOSED_LISTENERS, MAX_CLOSED_SPACES = 1024, 256


class ConnTable:
    def __init__(self, max_conns):
        self.max_conns = max_conns
        self.by_sk = {}             # skaddr -> Conn, oldest generation first
        # (family, laddr, lport, raddr, rport) -> Conn, only while a handshake is unresolved:
        # error reports (no skaddr) matter only for connects that fail. Kept small on purpose.
        self.by_tuple = {}
        self.seeded = {}            # tuple -> Conn seeded from /proc, no skaddr yet
        # netns -> {(family, laddr, lport): (pid, comm)}: who listens where, to name the owner
        # of what a listener accepts. The namespace is the records' (0 where the kernel side
        # cannot read it): containers all listen on 0.0.0.0:8080.
        self.listeners = {}
        # (netns, family, laddr, lport) -> who listens there now (_owner), or None: every
        # accept asks (accepted_by), and a host's answers are few. Emptied when a listener
        # comes or goes.
        self.owner_at = Memo(lambda key: self._owner(*key), limit=4096)
        # netns -> {(family, laddr, lport): (owner, opened_ns, closed_ns)}: listeners that have
        # closed, for children whose opening comes after that. A child resting in the kernel
        # (CLOSE_WAIT, say) reaches user space from a scan, up to an ordering window and a scan
        # late, or with its close, later still: by then its listener may be gone.
        self.closed_listeners = {}
        # skaddr -> the newest step taken of a connection dropped to stay within max_conns:
        # its socket's later records may carry those steps again (a held opening, sent early
        # and again with its close), and they must not be taken twice. About 100 bytes each
        # against a connection's 350, so kept for more of them (max_tombs); past that the
        # oldest go (tombs_dropped), and such a socket is seen anew at its next record.
        self.tombs = {}
        self.max_tombs = max(max_conns, 65_536)
        self.evicted = 0
        self.tombs_dropped = 0
        self._next_id = 1

    def __len__(self):
        return len(self.by_sk)

    def get(self, skaddr):
        return self.by_sk.get(skaddr)

    def add(self, skaddr, family, role, state, ts_ns, partial, epoch):
        """A new generation at skaddr. Returns (conn, victim): victim is the oldest connection,
        dropped to stay within max_conns (already forgotten), or None."""
        c = Conn(self._next_id, skaddr, family, role, state, ts_ns, partial, epoch)
        self._next_id += 1
        by_sk = self.by_sk
        by_sk[skaddr] = c
        victim = None
        if len(by_sk) > self.max_conns:
            victim = self._oldest()
            if victim is not None:
                self.evict(victim)
        return c, victim

    def _oldest(self):
        """The oldest connection that is not a listener (listeners are few, and name the owner
        of every connection they accept): listeners met at the front move to the back."""
        by_sk = self.by_sk
        for _ in range(len(by_sk)):
            sk = next(iter(by_sk))
            c = by_sk[sk]
            if c.role != LISTENER:
                return c
            by_sk[sk] = by_sk.pop(sk)
        return None

    def evict(self, c):
        self.evicted += 1
        self.forget(c)
        tombs = self.tombs
        tombs.pop(c.skaddr, None)
        tombs[c.skaddr] = c.since_ns
        if len(tombs) > self.max_tombs:
            del tombs[next(iter(tombs))]
            self.tombs_dropped += 1

    def forget(self, c):
        if c.tkey is not None:
            self.unfile(c)
        if self.by_sk.get(c.skaddr) is c:
            del self.by_sk[c.skaddr]

    def unfile(self, c):
        if self.by_tuple.get(c.tkey) is c:
            del self.by_tuple[c.tkey]
        c.tkey = None

    def set_tuple(self, c, laddr, lport, raddr, rport):
        """What a record says of c's endpoints. The first local port (the kernel picks it at
        connect()) files an unresolved connect by 4-tuple."""
        if lport and (c.lport != lport or c.laddr != laddr):
            if c.tkey is not None:
                self.unfile(c)
            c.laddr, c.lport, c.raddr, c.rport = laddr, lport, raddr, rport
            if c.established_ns is None:
                c.tkey = c.tuple_key()
                self.by_tuple[c.tkey] = c
        elif not c.rport and rport:
            c.raddr, c.rport = raddr, rport
        if c.laddr is None:
            c.laddr = laddr

    def seed(self, family, laddr, lport, raddr, rport, state, now_ns, owner, epoch, netns):
        """A socket that existed before tracing started (from /proc/net/tcp). Claimed by the
        first event whose 4-tuple matches (`claim`); its start is unknown. A listener only
        names the owner of the connections it will accept."""
        if state == S.LISTEN:
            if owner:
                self.listening(netns, family, laddr, lport, owner[:2])
            return None
        c = Conn(self._next_id, 0, family, None, state, now_ns, True, epoch)
        self._next_id += 1
        c.preexisting = True
        c.laddr, c.lport, c.raddr, c.rport = laddr, lport, raddr, rport
        if owner:
            c.pid, c.comm, c.fd = owner
            c.owner_sure = True
        self.seeded[c.tuple_key()] = c
        return c

    def listening(self, netns, family, laddr, lport, owner):
        """(pid, comm) `owner` listens on laddr:lport in namespace netns."""
        self.listeners.setdefault(netns, {})[(family, laddr, lport)] = owner
        self.owner_at.clear()

    def unlisten(self, netns, family, laddr, lport, owner, opened_ns, closed_ns):
        """That listener, open from opened_ns (None: before we started) to closed_ns, closed:
        forgotten, unless another owner listens there since; remembered as closed, for
        children that come late (accepted_by)."""
        space = self.listeners.get(netns)
        key = (family, laddr, lport)
        if space is not None and space.get(key) == owner:
            del space[key]
            if not space:
                del self.listeners[netns]
            self.owner_at.clear()
        closed = self.closed_listeners.get(netns)
        if closed is None:
            if len(self.closed_listeners) >= MAX_CLOSED_SPACES:
                del self.closed_listeners[next(iter(self.closed_listeners))]
            closed = self.closed_listeners[netns] = {}
        closed.pop(key, None)                   # the newest last: the oldest goes first
        if len(closed) >= MAX_CLOSED_LISTENERS:
            del closed[next(iter(closed))]
        closed[key] = (owner, opened_ns, closed_ns)

    def accepted_by(self, netns, family, laddr, lport, ts_ns):
        """(pid, comm) of the listener that took a connection to laddr:lport in namespace
        netns at ts_ns: the one listening there now, else one that listened then and has closed
        since; None if neither."""
        owner = self.owner_at[(netns, family, laddr, lport)]
        if owner is None and self.closed_listeners:
            closed = self.closed_listeners.get(netns)
            key = owning_listener(family, laddr, lport, closed) if closed else None
            if key is not None:
                owner, opened, until = closed[key]
                if not ((opened is None or opened <= ts_ns) and ts_ns <= until):
                    owner = None
        return owner

    def _owner(self, netns, family, laddr, lport):
        space = self.listeners.get(netns)
        if space:
            key = owning_listener(family, laddr, lport, space)
            if key is not None:
                return space[key]
        return None

    def claim(self, skaddr, key):
        """(the seeded connection with this 4-tuple, now known by its socket address, or None;
        the connection it displaced at that address, forgotten, or None)."""
        c = self.seeded.pop(key, None)
        old = None
        if c is not None:
            c.skaddr = skaddr
            old = self.by_sk.pop(skaddr, None)
            if old is not None:
                self.forget(old)
            self.by_sk[skaddr] = c
        return c, old
