"""Where findings go. Sinks only format: every decision was made by the detectors.

A sink turns a batch of findings into text (`format`) and writes it; writing, flushing and a
reader that went away are handled here, once, for every sink. The pipeline flushes after every
batch, i.e. at least every poll (100 ms): a log shipper reading the pipe sees each line within
that, without a write syscall per line.
"""


from tcptrace.errors import OutputError


class Closed(Exception):
    """The reader went away (EPIPE): stop quietly."""


class Sink:
    ordered = True      # findings must reach it in time order (the pipeline holds them back)

    def __init__(self, stream, wall_offset_ns):
        self.stream = stream
        self.wall_offset_ns = wall_offset_ns

    def format(self, findings):
        """The text of a non-empty batch, ending in a newline."""
        raise NotImplementedError

    def emit_many(self, findings):
        if findings:
            self.write(self.format(findings))

    def write(self, text):
        try:
            self.stream.write(text)
        except BrokenPipeError:
            raise Closed() from None
        except OSError as e:
            raise OutputError(f"cannot write output: {e.strerror}") from None

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise Closed() from None
        except OSError as e:
            raise OutputError(f"cannot write output: {e.strerror}") from None

    def bind(self, tracker):
        """The tracker whose findings it will get (a report reads its counters too)."""

    def advance(self, released_ns):
        """Every finding up to released_ns has been delivered (a report closes its windows)."""

    def close(self, end_ns):
        """End of the run at end_ns: whatever a sink prints last (the report's tables)."""
        self.flush()


def make_sink(opts, stream, wall_offset_ns, start_ns=None):
    """The sink the options ask for. start_ns: when the stream began (a report's first window
    starts there; without it, at its first finding)."""
    if opts.metrics:
        from tcptrace.output.metrics import MetricsSink
        return MetricsSink(stream, wall_offset_ns, by=opts.by)
    if opts.report:
        from tcptrace.output.report import ReportSink
        return ReportSink(stream, wall_offset_ns, as_json=opts.json, interval=opts.interval,
                          start_ns=start_ns)
    if opts.json:
        from tcptrace.output.jsonl import JsonSink
        return JsonSink(stream, wall_offset_ns)
    from tcptrace.output.text import TextSink
    return TextSink(stream, wall_offset_ns, wide=opts.wide)
