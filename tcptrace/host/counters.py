"""A network namespace's own counters and settings: /proc/<pid>/net/{netstat,snmp,sockstat}
(the namespace of <pid>) and the net.* sysctls (read from inside the namespace: netns.run_in).

Counters are the kernel's ground truth for what no tracepoint reports: SYNs dropped because a
listener's queue was full, SYN cookies, entries into TIME_WAIT.
"""
import os

from tcptrace.host import netns


def _pairs(path):
    """{"Prefix": {name: int}} of a /proc/net/{netstat,snmp} file: header and value lines in
    pairs, each led by its prefix."""
    out = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        prefix, _, names = head.partition(":")
        _, _, values = vals.partition(":")
        try:
            out[prefix] = dict(zip(names.split(), map(int, values.split())))
        except ValueError:
            continue
    return out


def tcp_counters(base="/proc/self"):
    """TcpExt and Tcp counters of the namespace of /proc/<pid> `base`, as one dict (the names
    do not collide: TcpExt's are prefixed-free, Tcp's are ActiveOpens, EstabResets...)."""
    out = {}
    for name in ("snmp", "netstat"):
        got = _pairs(os.path.join(base, "net", name))
        out.update(got.get("Tcp", {}))
        out.update(got.get("TcpExt", {}))
    return out


def sockstat(base="/proc/self"):
    """{"inuse", "orphan", "tw", "alloc", "mem"} of TCP in /proc/<pid>/net/sockstat: inuse,
    orphan and tw are the namespace's; alloc and mem are the host's."""
    with open(os.path.join(base, "net", "sockstat")) as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {k: int(v) for k, v in zip(parts[::2], parts[1::2])}
    return {}


SYSCTLS = ("net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog", "net/ipv4/tcp_syncookies",
           "net/ipv4/tcp_synack_retries", "net/ipv4/ip_local_port_range",
           "net/ipv4/tcp_tw_reuse", "net/ipv4/tcp_max_tw_buckets", "net/ipv4/tcp_fin_timeout")


def _read_sysctls(names):
    out = {}
    for n in names:
        try:
            with open(f"/proc/sys/{n}") as f:
                v = f.read().split()
        except OSError:
            continue
        out[n.rsplit("/", 1)[1]] = int(v[0]) if len(v) == 1 else tuple(int(x) for x in v)
    return out


def sysctls(base="/proc/self", names=SYSCTLS):
    """{name: value} of the net.* settings that bound listeners and TIME_WAIT, in the namespace
    of /proc/<pid> `base` (ip_local_port_range as a (low, high) pair)."""
    return netns.run_in(base, lambda: _read_sysctls(names))
