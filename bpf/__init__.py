# Makes bpf/ importable as tcptrace.bpf so the C sources ship inside the installed package and are
# found with importlib.resources. No Python lives here.
