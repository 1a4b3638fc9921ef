"""reset: a connection that ended in a reset, and which side sent it."""
from tcptrace.detect.base import Detector
from tcptrace.lifecycle.conn import path_names


class Resets(Detector):
    def closed(self, c):
        if (c.established_ns is None and not c.partial) or \
                (c.recv_reset_ns is None and c.send_reset_ns is None):
            return False
        start = c.established_ns if c.established_ns is not None else c.opened_ns
        path = path_names[c.path]
        if c.recv_reset_ns is not None and (c.send_reset_ns is None
                                            or c.recv_reset_ns <= c.send_reset_ns):
            by = "remote"
        else:
            by = "local"
        self.tr.finding(c, "reset", c.closed_ns, reset_by=by,
                        duration_ns=c.closed_ns - start if start is not None else None,
                        state=path[-2] if len(path) > 1 else None, path=path)
        return True
