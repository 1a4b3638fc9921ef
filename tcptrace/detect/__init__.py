"""Detectors: each turns what happens to connections into findings of one concern.

detect/base.py describes the hooks; each module here is one small detector. `standard()` is the
set the tracer runs, in the order they are asked to conclude a connection.
"""
import functools

from tcptrace.detect.close import Closes
from tcptrace.detect.connect import Handshakes
from tcptrace.detect.failure import FailedConnects
from tcptrace.detect.folded import Folded
from tcptrace.detect.listen import Listeners
from tcptrace.detect.lost import Losses
from tcptrace.detect.reset import Resets
from tcptrace.detect.stuck import Stuck
from tcptrace.detect.timewait import TimeWaits
from tcptrace.detect.transitions import Transitions


def standard(stuck_after_ns, transitions=False, confirm=None, resolve_owner=None,
             port_pressure=0.8, pressure_interval_ns=5_000_000_000, follow_time_wait=True,
             time_wait_sampling=None):
    """Detector factories (each called with the tracker). Closes, FailedConnects and Resets
    each conclude connections the others do not (a normal close, an opening that failed, a
    reset), so each connection gets one conclusion; the commonest is asked first. TimeWaits
    is asked before them and concludes nothing: it notes the step into TIME_WAIT."""
    out = [Handshakes, functools.partial(TimeWaits, threshold=port_pressure,
                                         follow=follow_time_wait,
                                         sampling=time_wait_sampling), Closes,
           FailedConnects, Resets,
           functools.partial(Stuck, stuck_after_ns=stuck_after_ns, confirm=confirm,
                             resolve_owner=resolve_owner),
           Losses, functools.partial(Listeners, interval_ns=pressure_interval_ns), Folded]
    if transitions:
        out.append(Transitions)
    return out
