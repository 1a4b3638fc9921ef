"""The kernel's own view of sockets and counters, read without BPF: sock_diag dumps (diag.py),
per-namespace counters and settings (counters.py), network namespaces (netns.py), and owners
from /proc (owners.py). Samplers read these on the tick; detectors compare them with what the
tracepoints said."""
