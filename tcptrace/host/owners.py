"""Which process holds a socket, read the way `ss -p` reads it.

/proc/net/tcp{,6} gives each socket's 4-tuple, state and inode; /proc/<pid>/fd links name the
inode of every socket a process holds. Used to seed sockets that existed before tracing began, to
confirm a socket is still stuck before saying so, and to name the process that holds it now.
"""
import os
import socket
import struct
import time

from tcptrace import states as S
from tcptrace.host import netns


def _addr(hexaddr, family):
    a, p = hexaddr.split(":")
    if family == S.AF_INET:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(a, 16)))
    else:
        # four host-endian 32-bit words
        words = struct.unpack("<4I", bytes.fromhex(a))
        ip = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))
    return ip, int(p, 16)


def sockets(base="/proc/self"):
    """[(family, laddr, lport, raddr, rport, state, inode)] for every TCP socket in the network
    namespace of `base` (/proc/self, or /proc/<pid> for another process's namespace)."""
    out = []
    for name, fam in (("tcp", S.AF_INET), ("tcp6", S.AF_INET6)):
        try:
            with open(f"{base}/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    laddr, lport = _addr(parts[1], fam)
                    raddr, rport = _addr(parts[2], fam)
                    out.append((fam, laddr, lport, raddr, rport, int(parts[3], 16), int(parts[9])))
        except OSError:
            continue
    return out


def all_sockets(root="/proc"):
    """{netns inode: sockets() of it} for every network namespace."""
    return {ino: sockets(base) for ino, base in netns.namespaces(root).items()}


def inode_owners(inodes, root="/proc", likely=()):
    """{inode: (pid, comm, fd)} for the wanted socket inodes (first holder found).

    The processes in `likely` (the owners the tracker already attributes) are searched first: a
    full scan reads every descriptor of every process, which takes seconds on a host holding
    hundreds of thousands of sockets, and is needed only for what they do not hold."""
    want = {f"socket:[{i}]": i for i in inodes if i}
    found = {}
    if not want:
        return found
    pids = [str(p) for p in dict.fromkeys(likely) if p]
    first = set(pids)
    for pid in pids + [p for p in os.listdir(root) if p.isdigit() and p not in first]:
        fddir = f"{root}/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fddir}/{fd}")
            except OSError:
                continue
            ino = want.get(link)
            if ino is not None and ino not in found:
                try:
                    with open(f"{root}/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = None
                found[ino] = (int(pid), comm, int(fd))
        if len(found) == len(want):
            break
    return found


class KernelView:
    """Confirmation and ownership for the lifecycle tracker, from /proc.

    Each network namespace has its own socket table; /proc/<pid>/net/tcp shows the one of <pid>'s
    namespace. A connection is looked up in the namespace of its known owner first, then in ours.
    Tables are cached for `max_age_s`, so a burst of due connections costs one read.
    """

    def __init__(self, root="/proc", max_age_s=0.1):
        self.root = root
        self.max_age_s = max_age_s
        self._tables = {}        # netns dir -> (monotonic time, {tuple: (state, inode)})

    def _table(self, base):
        now = time.monotonic()
        got = self._tables.get(base)
        if got is None or now - got[0] > self.max_age_s:
            table = {(fam, la, lp, ra, rp): (st, ino)
                     for fam, la, lp, ra, rp, st, ino in sockets(base)}
            got = self._tables[base] = (now, table)
        return got[1]

    def lookup(self, c):
        key = (c.family, c.laddr, c.lport, c.raddr, c.rport)
        bases = [self.root + "/self"]
        if c.pid:
            bases.insert(0, f"{self.root}/{c.pid}")
        for base in bases:
            try:
                got = self._table(base).get(key)
            except OSError:
                continue
            if got:
                return got
        return None

    def confirm(self, c):
        """True: the kernel has this socket in c.state now; False: it does not."""
        got = self.lookup(c)
        return bool(got and got[0] == c.state)

    def resolve(self, conns):
        """{conn.id: (pid, comm, fd)}; an orphan (closed by its process, still in the kernel)
        maps to (None, None, None)."""
        inodes = {}
        for c in conns:
            got = self.lookup(c)
            if got:
                inodes[c.id] = got[1]
        owners = inode_owners(set(inodes.values()), self.root, likely=[c.pid for c in conns])
        return {cid: owners.get(ino, (None, None, None)) for cid, ino in inodes.items()}


_NR_PIDFD_GETFD = 438


def fd_is_tcp(pid, fd):
    """Is <pid>'s descriptor <fd> a TCP socket? True/False, or None when it cannot be told (the
    process or descriptor is gone, or the kernel lacks pidfd_getfd, 5.6+).

    The connect() syscall tracepoints see every socket type; this tells TCP from UDP after the
    fact by borrowing the descriptor, the only way that reads no kernel struct."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    try:
        from tcptrace.kernel.bpfsys import LIBC
        newfd = LIBC.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0)
        if newfd < 0:
            return None
        try:
            s = socket.socket(fileno=newfd)
        except OSError:
            os.close(newfd)     # (borrowed: a copy of another process's file, ours to close)
            return False        # not a socket
        with s:
            return s.type == socket.SOCK_STREAM and s.proto in (0, socket.IPPROTO_TCP) \
                and s.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        os.close(pidfd)
