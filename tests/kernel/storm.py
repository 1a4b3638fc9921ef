"""Background load: loopback connections made and closed, paced at RATE a second, until stdin
closes. Run as a script by the stress mode of tests/kernel/test_hold.py, one per CPU, so that
both CPUs make transitions while a test's own do (what the tracer must keep up with, and what
takes the CPU's bpf_prog_active while a test's sockets change state).

    storm.py RATE
"""
import socket
import sys
import threading
import time


def main():
    rate = float(sys.argv[1])
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    t0, n = time.monotonic(), 0
    print("storming", flush=True)
    while not done.is_set():
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        c.close()
        a.close()
        n += 1
        ahead = t0 + n / rate - time.monotonic()
        if ahead > 0:
            done.wait(ahead)                 # pacing the load, not waiting for anything


if __name__ == "__main__":
    main()
