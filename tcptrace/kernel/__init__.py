"""The kernel stage: what this machine supports (probes.py, btf.py, no bcc), and the compiled,
attached programs with their transport (source.py, the one module that imports bcc)."""
