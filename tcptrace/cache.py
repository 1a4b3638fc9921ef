"""The one bounded cache tcptrace uses for per-record conversions.

A busy host repeats a handful of values (its addresses, command names, state paths, owners), so
converting each once and looking it up after is most of what keeps per-record work cheap. `Memo`
is a dict: a hit is one C-level subscript (`cache[key]`), no Python call; only a miss runs
`__missing__`. It is emptied when it grows past `limit`, so a host with unbounded distinct values
costs bounded memory (a few conversions again after each emptying).
"""


class Memo(dict):
    """`memo[key]` is `fn(key)`, computed once per key until the cache is emptied."""
    __slots__ = ("fn", "limit")

    def __init__(self, fn, limit=10_000):
        super().__init__()
        self.fn = fn
        self.limit = limit

    def __missing__(self, key):
        if len(self) >= self.limit:
            self.clear()
        v = self[key] = self.fn(key)
        return v


class ObjectMemo(Memo):
    """`memo.of(obj)` is `fn(obj)`, computed once per object while it lives: keyed by identity,
    for objects that are shared rather than equal and cannot be keys themselves (a path list).
    An id reused by a new object after the old one died is told apart by keeping the object
    with its value."""
    __slots__ = ()

    def of(self, obj):
        got = self.get(id(obj))
        if got is None or got[0] is not obj:
            if len(self) >= self.limit:
                self.clear()
            got = self[id(obj)] = (obj, self.fn(obj))
        return got[1]
