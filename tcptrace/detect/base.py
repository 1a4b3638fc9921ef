"""What every detector is: a small class whose hooks the lifecycle calls.

The lifecycle (tcptrace/lifecycle/machine.py) rebuilds connections from kernel facts and tells
detectors what happened to them. A detector defines any of these hooks (the tracker calls only
the ones it defines) and makes findings with `self.tr.finding()` / `self.tr.conclude()`:

  established(c, ts, old)   c's handshake completed at ts (old: SYN_SENT or SYN_RECV), for a
                            connection whose opening was seen
  closing(c, ts, old)       c's CLOSE transition, as it happens
  closed(c) -> bool         c is over: its CLOSE, after a grace period for facts that follow
                            it; return True if this detector concluded it (later ones are then
                            not asked, so each connection gets one conclusion)
  resting(c)                c entered a half-closed state, where it may rest
  moved(c, ts, new)         c, resting or reported stuck, made a transition to `new`
  gone(c)                   c is no longer tracked (closed, replaced, evicted, adopted)
  step(c, ev, ts, old, new) every transition (asking for it costs a call per transition)
  fact(ev)                  a record that belongs to no connection (connect() failing early)
  lost(rec)                 the kernel side lost records
  sample(rec)               a sampler's reading of the kernel's tables or counters (wire.Sample)
  clock(now_ns)             the clock moved on (every poll)

A detector whose options make a hook pointless sets it to None in __init__: the tracker then
does not call it (hooks like `closed` run for every socket).

A detector that needs readings of the host's tables names their samplers (tcptrace/host) in
SAMPLERS, the finding types those readings change in SAMPLED_FOR (they run only when one of
those is shown), and any keyword arguments for them in a `sampler_options` dict.

tests/unit/test_lifecycle.py and the other unit tests drive them on hand-built streams
(tests/streams.py); docs/design.md walks through adding one.
"""

HOOKS = ("established", "closing", "closed", "resting", "moved", "gone", "step", "fact", "lost",
         "sample", "clock")


class Detector:
    def __init__(self, tracker):
        self.tr = tracker


def nothing(*_args):
    return False


def dispatch(detectors, hook):
    """One callable for a hook: nothing, the only subscriber's method itself (most hooks have
    one, and they run per connection), or a loop. `closed` stops at the first True."""
    fns = [fn for fn in (getattr(d, hook, None) for d in detectors) if fn is not None]
    if not fns:
        return nothing
    if len(fns) == 1:
        return fns[0]
    if hook == "closed":
        def first(c):
            for fn in fns:
                if fn(c):
                    return True
            return False
        return first

    def every(*args):
        for fn in fns:
            fn(*args)
    return every
