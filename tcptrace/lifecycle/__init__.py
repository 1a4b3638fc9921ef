"""The lifecycle stage: connections rebuilt from kernel facts (machine.py), the table that holds
them (table.py), and the whole-record fast paths (fast.py)."""
from tcptrace.lifecycle.conn import ACTIVE, LISTENER, PASSIVE, Conn, path_states  # noqa: F401
from tcptrace.lifecycle.machine import Stats, Tracker  # noqa: F401
