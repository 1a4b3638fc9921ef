"""lost: records the kernel side could not deliver, as findings in the stream."""
from tcptrace.detect.base import Detector
from tcptrace.findings import Finding


class Losses(Detector):
    def lost(self, rec):
        self.tr.emit(Finding("lost", rec.ts_ns, count=rec.count, where=rec.where,
                             lost_total=self.tr.stats.lost_total))
