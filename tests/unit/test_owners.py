"""/proc/net/tcp parsing, checked against this process's own sockets (no root needed)."""
import os
import socket

import pytest

from tcptrace import states as S
from tcptrace.host import owners


def test_parses_own_listening_and_connected_sockets():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    try:
        socks = {(s[1], s[2], s[3], s[4]): s for s in owners.sockets()}
        lst = socks[("127.0.0.1", port, "0.0.0.0", 0)]
        assert lst[5] == S.LISTEN
        est = socks[("127.0.0.1", c.getsockname()[1], "127.0.0.1", port)]
        assert est[5] == S.ESTABLISHED
        own = owners.inode_owners({est[6]})
        import os
        assert own[est[6]][0] == os.getpid() and own[est[6]][2] == c.fileno()
    finally:
        for s in (c, a, srv):
            s.close()


def test_parses_ipv6():
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen()
    try:
        port = srv.getsockname()[1]
        assert any(s[0] == S.AF_INET6 and s[1] == "::1" and s[2] == port and s[5] == S.LISTEN
                   for s in owners.sockets())
    finally:
        srv.close()


def test_fd_is_tcp_tells_tcp_from_udp():
    import os
    t = socket.socket()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        got_t = owners.fd_is_tcp(os.getpid(), t.fileno())
        got_u = owners.fd_is_tcp(os.getpid(), u.fileno())
        if got_t is None:
            import pytest
            pytest.skip("pidfd_getfd unavailable (kernel < 5.6 or no ptrace rights)")
        assert got_t is True and got_u is False
    finally:
        t.close()
        u.close()


def test_all_namespaces_are_read_once_each(tmp_path):
    """A fake /proc: two processes in one namespace, one in another."""
    import os
    for pid, ns, port in (("self", 1, 80), ("10", 1, 80), ("11", 2, 443)):
        d = tmp_path / pid
        (d / "net").mkdir(parents=True)
        (d / "ns").mkdir()
        (d / "ns" / "net").write_text("")
        os.utime(d / "ns" / "net")
        line = f"   0: 0100007F:{port:04X} 00000000:0000 0A 0:0 00:0 0 0 0 {100 + port} 1\n"
        (d / "net" / "tcp").write_text("  sl  local_address ...\n" + line)
    # make the namespace files of 'self' and '10' the same inode, '11' another one
    os.remove(tmp_path / "10" / "ns" / "net")
    os.link(tmp_path / "self" / "ns" / "net", tmp_path / "10" / "ns" / "net")
    from tcptrace.host import netns
    assert list(netns.namespaces(str(tmp_path)).values()) == [f"{tmp_path}/self", f"{tmp_path}/11"]
    spaces = owners.all_sockets(str(tmp_path))
    ino = {name: os.stat(tmp_path / name / "ns" / "net").st_ino for name in ("self", "11")}
    assert {ns: [s[2] for s in socks] for ns, socks in spaces.items()} == \
        {ino["self"]: [80], ino["11"]: [443]}


def test_borrowing_a_descriptor_that_is_no_socket_leaks_nothing():
    """fd_is_tcp borrows the descriptor (pidfd_getfd): the copy must be closed whatever it is,
    or a long-running tracer holds other processes' files and locks (it held a Vagrant lock
    file for hours)."""
    r, w = os.pipe()
    tcp = socket.socket()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        got = owners.fd_is_tcp(os.getpid(), r)
        if got is None:
            pytest.skip("pidfd_getfd unavailable here")
        assert got is False
        assert owners.fd_is_tcp(os.getpid(), tcp.fileno()) is True
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(r)
        os.close(w)
        tcp.close()
