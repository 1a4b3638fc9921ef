"""close: a connection that ended normally: how long it lived, who closed first, and whether
its side went on into TIME_WAIT (inferred: detect/timewait.py)."""
from tcptrace.detect.base import Detector
from tcptrace.detect.timewait import TIME_WAIT_NS, entered_time_wait
from tcptrace.findings import Close
from tcptrace.lifecycle.conn import path_names


class Closes(Detector):
    def closed(self, c):
        if (c.established_ns is None and not c.partial) or c.recv_reset_ns is not None \
                or c.send_reset_ns is not None:
            return False      # never opened (a failed connect, or the listener's business), or reset
        start = c.established_ns if c.established_ns is not None else c.opened_ns
        ts = c.closed_ns
        tw = entered_time_wait(c)
        self.tr.conclude(Close, c, ts, ts - start if start is not None else None, c.first_fin,
                         path_names[c.path], tw, TIME_WAIT_NS if tw else None)
        return True
