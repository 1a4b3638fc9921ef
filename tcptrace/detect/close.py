"""close: a connection that ended normally: how long it lived and who closed first."""
from tcptrace.detect.base import Detector
from tcptrace.findings import Close
from tcptrace.lifecycle.conn import path_names


class Closes(Detector):
    def closed(self, c):
        if (c.established_ns is None and not c.partial) or c.recv_reset_ns is not None \
                or c.send_reset_ns is not None:
            return False      # never opened (a failed connect, or the listener's business), or reset
        start = c.established_ns if c.established_ns is not None else c.opened_ns
        ts = c.closed_ns
        self.tr.conclude(Close, c, ts, ts - start if start is not None else None, c.first_fin,
                         path_names[c.path])
        return True
