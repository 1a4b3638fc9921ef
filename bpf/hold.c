/* Held opens: a socket's steps up to ESTABLISHED wait, for config.hold_us, for its next
 * transitions. Most connections are short, and their opening and closing steps then go out as
 * one record instead of two, which halves what user space decodes and sorts. Part of
 * tcptrace.c; state.c decides when to hold and when to carry the steps back. */

#ifdef TT_HOLD
#ifndef TT_HELD_MAX
#define TT_HELD_MAX 65536
#endif
/* held: per socket, the steps up to ESTABLISHED. Inserted at ESTABLISHED (tt_hold, moved from
 * `socks`); deleted by the socket's next transition (tt_unhold), which carries the steps back
 * into `socks` ahead of its own, or sends them alone. Only the socket's own transitions,
 * serialised by its lock, ever write or delete an entry. A socket still here after hold_us is
 * sent early by tt_flush (a copy, flagged TT_F_HELD; the entry stays until the next transition,
 * which carries the steps again: user space takes them once). So the map holds every
 * ESTABLISHED socket, up to its size; past that a socket's steps are sent at ESTABLISHED, as
 * without holding. Not preallocated (unlike `socks`, preallocating it gained nothing measurable:
 * docs/bench.md); user space never walks it. */
BPF_F_TABLE("hash", u64, struct tt_event, held, TT_HELD_MAX, BPF_F_NO_PREALLOC);
/* held_q: the held sockets in the order they were held, as (socket, the ESTABLISHED step's
 * time): what tt_flush finds due without walking `held`. Pushed with each `held` entry; popped
 * by tt_flush on a later hit once hold_us old, or, when no hit comes, by user space
 * (tcptrace/kernel/source.py: KernelSource._due_held). An entry whose socket has moved on, or
 * whose address a newer socket holds, is dropped when popped. */
struct tt_hold {
    u64 sk;
    u64 ts;
};
BPF_QUEUE(held_q, struct tt_hold, TT_HELD_MAX);
/* flushbuf: where tt_flush builds its copy (the stack has no room for a second record),
 * overwritten by each. Per CPU; only the state hook's first program uses it (not its twin), and
 * the kernel never runs a program twice at once on a CPU (a regular tracepoint program:
 * bpf_prog_active; a raw one: its own count of runs), so it is never used twice at once. */
BPF_PERCPU_ARRAY(flushbuf, struct tt_event, 1);
#define TT_FLUSH_PER_HIT 2   /* a connection holds two sockets and makes about ten hits */
/* flush_after: per CPU, a time before which tt_flush need not look at held_q (a helper call and
 * the queue's lock, shared by the CPUs, on every hit): the due time of the head it last found not
 * due, as entries behind it were held after it, or, having found the queue empty, a hold time
 * after that look, as what is held next is due no earlier. Pops elsewhere only make the head
 * later. Entries pushed within microseconds of each other on two CPUs can sit out of time order
 * in the queue; such an entry goes out that much late. */
BPF_PERCPU_ARRAY(flush_after, u64, 1);
/* requeued: per CPU, early copies the transport refused (both buffers full) and that went back
 * into held_q to be tried again; lost: those the full queue did not take back either, which
 * are then reported only with the socket's next transition. Incremented here, never deleted;
 * user space reads them at exit (tcptrace/kernel/source.py). */
BPF_PERCPU_ARRAY(requeued, u64, 2);

/* Hold an ESTABLISHED socket's steps: 1 if held, 0 if they must go out now. */
static __always_inline int tt_hold(u64 sk, u64 ts, struct tt_event *e)
{
    if (!tt_hold_us())
        return 0;
    if (held.insert(&sk, e) != 0)       /* full, or a stale entry (checked at opening steps) */
        return 0;
    struct tt_hold q = {.sk = sk, .ts = ts};
    if (held_q.push(&q, 0) != 0) {      /* nothing would send it early: not held */
        held.delete(&sk);
        return 0;
    }
    return 1;
}

/* The socket's held steps, or 0. */
static __always_inline struct tt_event *tt_held(u64 sk)
{
    return held.lookup(&sk);
}

/* The socket's next transition releases its held steps h: carried (copied into `socks` by the
 * caller), or else sent now, alone, flagged TT_F_HELD, since they may have been sent early
 * already and user space must take them once. */
static __always_inline void tt_unhold(void *ctx, u64 sk, struct tt_event *h, u64 ts, int carried)
{
    if (!carried) {
        h->flags |= TT_F_HELD;
        h->ts_ns = ts;
        tt_emit(ctx, h);
    }
    held.delete(&sk);
}

/* Send what is due at the head of held_q: sockets held hold_us ago and still ESTABLISHED. A copy
 * goes out; the entry stays for the socket's own next transition (see `held`). A copy the
 * transport refuses goes back into the queue (at its tail, with its own time, so it is due at
 * once) and this hit stops: dropping it would leave a long-lived connection unreported until
 * it closes, which under a burst of thousands of opens is what happened. */
static __always_inline void tt_flush(void *ctx)
{
    u32 hold_us = tt_hold_us();
    if (!hold_us)
        return;
    int zero = 0;
    struct tt_event *f = flushbuf.lookup(&zero);
    u64 *after = flush_after.lookup(&zero);
    if (!f || !after)
        return;
    u64 now = bpf_ktime_get_ns();
    if (now < *after)
        return;
    u64 hold_ns = (u64)hold_us * 1000;
#pragma unroll
    for (int i = 0; i < TT_FLUSH_PER_HIT; i++) {
        struct tt_hold q = {};
        if (held_q.peek(&q) != 0) {
            *after = now + hold_ns;
            return;
        }
        if (now - q.ts < hold_ns) {
            *after = q.ts + hold_ns;
            return;
        }
        if (held_q.pop(&q) != 0)
            return;
        struct tt_event *h = held.lookup(&q.sk);
        if (!h || h->ts_ns != q.ts)
            continue;
        __builtin_memcpy(f, h, sizeof(*f));
        f->flags |= TT_F_HELD;
        f->ts_ns = now;
        if (tt_send(ctx, f) < 0) {
            u32 k = held_q.push(&q, 0) == 0 ? 0 : 1;
            u64 *n = requeued.lookup(&k);
            if (n)
                (*n)++;
            return;
        }
    }
}

#else
/* Without queue maps (before 4.20) nothing is held: steps go out at ESTABLISHED. */
static __always_inline int tt_hold(u64 sk, u64 ts, struct tt_event *e) { return 0; }
static __always_inline struct tt_event *tt_held(u64 sk) { return 0; }
static __always_inline void tt_unhold(void *ctx, u64 sk, struct tt_event *h, u64 ts,
                                      int carried) {}
static __always_inline void tt_flush(void *ctx) {}
#endif
