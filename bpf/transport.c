/* Records to user space: the events map (a BPF ring buffer, or a perf event array), the spill
 * buffer behind the ring, and the counts of what neither took. User space drains them on a
 * short timer (tcptrace/kernel/transport.py). Part of tcptrace.c. */

#ifdef TT_RINGBUF
/* events: every record, consumed by user space on every drain. */
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
/* spill: where a record goes when the ring refuses it, consumed by user space on every drain.
 * The ring refuses records now and then although it is nearly empty (on the 6.18 development
 * guest: 3-20 per 470k records, with at most 0.3 MB of the 8 MB in use at any read, the same
 * with 32 MB; cause unknown), and the per-CPU perf buffers do not share it. */
BPF_PERF_OUTPUT(spill);
/* spilled: per kind, per CPU, records that went through `spill`; incremented here, never
 * reset, read by user space with the losses. */
BPF_PERCPU_ARRAY(spilled, u64, TT_KIND_MAX);
#else
/* events: every record, consumed by user space on every drain. */
BPF_PERF_OUTPUT(events);
#endif
/* drops: transitions (or other records) the transport refused (buffer full), per kind, per CPU;
 * incremented here, never reset, read by user space as deltas. Counted here because the perf
 * "lost" record arrives only when a later record fits, and the ring buffer has none. */
BPF_PERCPU_ARRAY(drops, u64, TT_KIND_MAX);

/* Send a record; < 0 if no buffer took it. */
static __always_inline int tt_send(void *ctx, struct tt_event *ev)
{
    int rc;
#ifdef TT_RINGBUF
    /* No wake-up per record: waking the reader costs 8-10 us per event on small machines. */
    rc = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
    if (rc < 0) {
        rc = spill.perf_submit(ctx, ev, sizeof(*ev));
        if (rc == 0) {
            u32 k = ev->kind;
            u64 *n = spilled.lookup(&k);
            if (n)
                (*n)++;
        }
    }
#else
    rc = events.perf_submit(ctx, ev, sizeof(*ev));
#endif
    return rc;
}

/* Send a record, counting it in `drops` if no buffer took it. */
static __always_inline void tt_emit(void *ctx, struct tt_event *ev)
{
    if (tt_send(ctx, ev) < 0) {
        u32 k = ev->kind;
        u64 *n = drops.lookup(&k);
        if (n)
            *n += ev->nsteps ? ev->nsteps : 1;   /* transitions lost, not records */
    }
}
