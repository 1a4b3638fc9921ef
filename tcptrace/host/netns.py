"""Network namespaces: which exist, and doing something inside one.

A tracepoint sees every namespace (containers, the test lab), so whatever is sampled from the
kernel's tables must be sampled per namespace. /proc/<pid>/net/* already shows <pid>'s
namespace; sysctls and netlink sockets belong to the namespace of the task that opens them, so
for those a short-lived thread enters the namespace (setns(2) changes only the calling thread).
"""
import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def members(root="/proc"):
    """{netns inode: [/proc/<pid> of every task in it]}, ours first (as /proc/self)."""
    out = {}
    for entry in ["self"] + [p for p in os.listdir(root) if p.isdigit()]:
        try:
            ino = os.stat(f"{root}/{entry}/ns/net").st_ino
        except OSError:
            continue
        out.setdefault(ino, []).append(f"{root}/{entry}")
    return out


def namespaces(root="/proc"):
    """{netns inode: /proc/<pid> of one task in it}, ours first."""
    return {ino: tasks[0] for ino, tasks in members(root).items()}


def own():
    return os.stat("/proc/self/ns/net").st_ino


def run_in(base, fn):
    """fn() run in the network namespace of /proc/<pid> `base` (its return value, or its
    exception raised here). In our own namespace it runs on this thread."""
    if os.stat(f"{base}/ns/net").st_ino == own():
        return fn()
    result = {}

    def body():
        try:
            fd = os.open(f"{base}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns: {os.strerror(e)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:       # handed to the caller's thread
            result["error"] = e
    t = threading.Thread(target=body, name="tcptrace-netns", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
