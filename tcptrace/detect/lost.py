"""lost and evicted: what the kernel side could not deliver, and what the tracker dropped to
stay within --max-conns, as findings in the stream (not only on stderr)."""
from tcptrace.detect.base import Detector
from tcptrace.findings import Finding


class Losses(Detector):
    def __init__(self, tracker):
        super().__init__(tracker)
        self.evicted = 0          # evictions reported so far

    def lost(self, rec):
        self.tr.emit(Finding("lost", rec.ts_ns, count=rec.count, where=rec.where,
                             lost_total=self.tr.stats.lost_total))

    def clock(self, now_ns):
        table = self.tr.table
        if table.evicted > self.evicted:
            self.tr.emit(Finding("evicted", now_ns, count=table.evicted - self.evicted,
                                 evicted_total=table.evicted, max_conns=table.max_conns))
            self.evicted = table.evicted
