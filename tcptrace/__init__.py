"""tcptrace: TCP connection lifecycles from the kernel's own state transitions."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
