"""Processes that hold many loopback connections at once (issue 17 item 2): each opens its
share to a listener of its own, accepting in batches, holds them, then closes them all. Run as
a script by tests/kernel/test_many_open.py: one JSON line per phase on stdout, so the test
knows when every connection is open (and since when) without sleeping.

    holders.py ADDR PORT COUNT HOLD_S [RATE]   (HOLD_S 0: hold until stdin closes; RATE:
                                                connections opened per second, 0 or none:
                                                as fast as they can be)
"""
import json
import resource
import socket
import sys
import time


def main():
    addr, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * count + 64), hard))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(4096)
    print(json.dumps({"listening": port}), flush=True)
    sys.stdin.readline()                     # go
    t0 = time.time()
    clients, accepted = [], []
    while len(clients) < count:
        for _ in range(min(256, count - len(clients))):
            c = socket.socket()
            c.connect((addr, port))
            clients.append(c)
        while len(accepted) < len(clients):
            accepted.append(srv.accept()[0])
        if rate:                             # pacing the opens, not waiting for anything
            time.sleep(max(0.0, t0 + len(clients) / rate - time.time()))
    print(json.dumps({"open": count, "t0": t0, "t1": time.time(),
                      "ports": [c.getsockname()[1] for c in clients]}), flush=True)
    if hold:
        time.sleep(hold)
    else:
        sys.stdin.read()                     # until stdin closes
    for c in clients:
        c.close()
    for a in accepted:
        a.close()
    srv.close()
    print(json.dumps({"closed": count}), flush=True)


if __name__ == "__main__":
    main()
