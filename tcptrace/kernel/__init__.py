"""The kernel stage: what this machine supports (probes.py, btf.py; no bcc), the programs
compiled and attached for a plan (loader.py, the one module that imports bcc), raw bpf(2)
(bpfsys.py), the transport (transport.py), the loss counters (losses.py, tally.py), and
source.py, the KernelSource that puts them together."""
