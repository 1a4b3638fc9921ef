/* TCP state transitions, grouped: the kernel keeps a socket's steps in `socks` and sends them as
 * one record when the socket reaches a state where it may rest for long or is gone (or the
 * record is full); at ESTABLISHED they are held for the close (hold.c). Which transitions send,
 * name the owner or start a new socket is not decided here: the loader passes the rules of
 * tcptrace/lifecycle/rules.py as macros, so user space reads the records by the same rules.
 * Part of tcptrace.c. */

#if !defined(TT_OWNER_STEP) || !defined(TT_OPENING_STEP) || !defined(TT_SEND_AT)
#error "TT_OWNER_STEP, TT_OPENING_STEP and TT_SEND_AT come from tcptrace/lifecycle/rules.py"
#endif

#ifndef TT_SOCKS_MAX
#define TT_SOCKS_MAX 65536
#endif
/* socks: per socket, the transitions not sent yet: a TT_STATE record being filled. Inserted at a
 * socket's first transition that is not sent at once (tt_start) or by a held socket's next one
 * (tt_carry); deleted when the record is sent (at a state TT_SEND_AT names, when full, or before
 * a step that starts a new record) or moved to `held` at ESTABLISHED. So it holds only sockets
 * between those states: in a handshake, in a close, or resting half-closed. User space reads it
 * on a timer (tcptrace/kernel/source.py: KernelSource.scan) and never writes it. A plain hash,
 * not LRU: an eviction would lose steps silently, while a full map only makes a transition go
 * out on its own. Preallocated (about 18 MB of kernel memory for its 65,536 entries, taken at
 * load): a connection's two sockets each insert and delete an entry twice (opening, close), and
 * the non-preallocated allocator's frees were the costliest part of that traffic; flat out under
 * `metrics` the workload kept 5-14% more of its rate on an Intel Xeon host (docs/bench.md).
 * Sized for 65,536 sockets in between at once, not more: reading it walks every bucket, full or
 * empty (190 us per read at 262,144 entries, 10 reads a second). An entry whose CLOSE was never
 * seen (a recursion miss) stays until its address is reused by a new socket. */
BPF_F_TABLE("hash", u64, struct tt_event, socks, TT_SOCKS_MAX, 0);

/* One transition, and what the rules say of it. */
struct tt_hit {
    u64 sk;
    u64 id;         /* bpf_get_current_pid_tgid() */
    u64 ts;
    u8 old;
    u8 new;
    u8 owner;       /* a process makes this step itself: its task is the socket's owner */
    u8 opening;     /* a new socket at this address */
    u8 send;        /* the socket may rest here for long, or is gone: send what is pending */
};

static __always_inline void tt_put_step(struct tt_event *e, u32 n, struct tt_hit *h)
{
    if (n >= TT_MAX_STEPS)
        return;
    e->step_ts[n] = h->ts;
    e->step_pid[n] = h->id >> 32;
    e->step_old[n] = h->old;
    e->step_new[n] = h->new;
    /* Steps before the count: user space may read the entry while it is being written. */
    asm volatile("" ::: "memory");
    e->nsteps = n + 1;
}

/* Must the pending record e go out, alone, before this step? At an opening (a new socket at the
 * address of one whose CLOSE we never saw: a recursion miss; user space sees the gap), and at
 * another task's owner step, since a record names one task (only a record carrying a held
 * connect() can meet one). */
static __always_inline int tt_breaks(struct tt_event *e, struct tt_hit *h)
{
    return h->opening || (h->owner && (e->flags & TT_F_OWNER) && tt_other_task(e, h->id));
}

/* A held socket's next transition: its steps go back into `socks`, ahead of this one (the entry
 * returned), or out now, alone (0). */
static __always_inline struct tt_event *tt_carry(void *ctx, struct tt_hit *h)
{
    struct tt_event *held = tt_held(h->sk);
    if (!held)
        return 0;
    struct tt_event *e = 0;
    if (!tt_breaks(held, h) && socks.insert(&h->sk, held) == 0)
        e = socks.lookup(&h->sk);
    tt_unhold(ctx, h->sk, held, h->ts, e != 0);
    return e;
}

/* The record this step joins: the socket's pending one, or its held steps carried back; 0 if
 * there is none. */
static __always_inline struct tt_event *tt_pending(void *ctx, struct tt_hit *h)
{
    struct tt_event *e = socks.lookup(&h->sk);
    if (e && tt_breaks(e, h)) {
        tt_emit(ctx, e);
        socks.delete(&h->sk);
        e = 0;
    }
    return e ? e : tt_carry(ctx, h);
}

#ifdef TT_RESCUE
/* told: per CPU, the socket whose SYN_SENT -> CLOSE record carried an errno last, and that
 * errno. A connect the peer refuses or the kernel gives up on ends in tcp_done_with_error(): the
 * CLOSE (which carries the errno, tt_close_err) and then, on the same CPU, the error report
 * saying the same (facts.c: tt_sock_error skips it). One slot: the report follows its CLOSE
 * directly; a report that comes first (an ICMP error's) finds another socket there. */
struct tt_told {
    u64 sk;
    s32 err;
};
BPF_PERCPU_ARRAY(told, struct tt_told, 1);
#endif

/* The errno an attempt died of, at its SYN_SENT -> CLOSE: the kernel sets sk_err before it
 * closes the socket (tcp_write_err, tcp_reset, tcp_v4_err, tcp_abort), but its error report
 * may come after the CLOSE (tcp_done_with_error, 6.10 and the stable kernels it went to). User
 * space waits a short grace for facts that follow a CLOSE; an emulated or loaded host can take
 * longer than that between the two, and the attempt would be concluded "cancelled". Read here,
 * the errno travels with the CLOSE itself, at the offset BTF gave raw.c (which reads it
 * too); 0 without. */
static __always_inline s32 tt_close_err(struct tt_hit *h)
{
    s32 err = 0;
#ifdef TT_RESCUE
    if (h->old == TT_SYN_SENT && h->new == TT_CLOSE) {
        bpf_probe_read_kernel(&err, sizeof(err), (void *)(h->sk + TT_OFF_ERR));
        int zero = 0;
        struct tt_told *t = told.lookup(&zero);
        if (t && err) {
            t->sk = h->sk;
            t->err = err;
        }
    }
#endif
    return err;
}

/* Did this socket's CLOSE record carry this errno already (see `told`)? Without the rescue's
 * offsets no CLOSE record carries one. */
static __always_inline int tt_told_before(u64 sk, s32 err)
{
#ifdef TT_RESCUE
    int zero = 0;
    struct tt_told *t = told.lookup(&zero);
    return t && sk && t->sk == sk && t->err == err;
#else
    return 0;
#endif
}

/* A new record for this step, waiting in `socks` for the socket's next steps (the entry
 * returned); or, at a state to send at or with the map full, sent now with this step alone (0). */
static __always_inline struct tt_event *tt_start(void *ctx, struct tt_hit *h, struct tt_sk *s)
{
    struct tt_event ev = {};
    ev.kind = TT_STATE;
    ev.skaddr = h->sk;
    tt_set_task(&ev, h->id);
    if (h->owner)
        ev.flags = TT_F_OWNER;
    ev.ts_ns = h->ts;
    ev.oldstate = h->old;
    ev.newstate = h->new;
    ev.err = tt_close_err(h);
    tt_put_sk(&ev, s);
    /* A listener's and its children's records name their namespace: user space matches an
     * accepted connection to its listener's owner by it (many namespaces listen on one port).
     * Only those, since the read costs two probe reads. */
    if (h->old == TT_LISTEN || h->new == TT_LISTEN)
        ev.aux = tt_netns(h->sk);
    if (!h->send && socks.insert(&h->sk, &ev) == 0) {
        struct tt_event *e = socks.lookup(&h->sk);
        if (e)
            return e;
    }
    tt_put_step(&ev, 0, h);
    tt_emit(ctx, &ev);
    return 0;
}

/* A pending record takes the newest step's fields (and, at an owner's step, its task). */
static __always_inline void tt_update(struct tt_event *e, struct tt_hit *h, struct tt_sk *s)
{
    e->ts_ns = h->ts;
    e->oldstate = h->old;
    e->newstate = h->new;
    e->err = tt_close_err(h);
    if (s->sport)               /* CLOSE->SYN_SENT has no local port yet */
        tt_put_sk(e, s);
    if (h->owner) {
        tt_set_task(e, h->id);
        e->flags |= TT_F_OWNER;
    }
}

/* Add the step to the socket's record; at a state to send at, or with the record full, it goes
 * out, or, at ESTABLISHED, is held, or, at CLOSE, is folded (aggregate.c). */
static __always_inline void tt_add_step(void *ctx, struct tt_event *e, struct tt_hit *h)
{
    u32 n = e->nsteps;
    tt_put_step(e, n, h);
    if (!h->send && n + 1 < TT_MAX_STEPS)
        return;
    int kept = h->new == TT_ESTABLISHED ? n + 1 < TT_MAX_STEPS && tt_hold(h->sk, h->ts, e)
                                         : h->new == TT_CLOSE && tt_fold(e);
    if (!kept)
        tt_emit(ctx, e);
    socks.delete(&h->sk);
}

/* sock:inet_sock_set_state, TCP only (the caller checked the protocol). */
static __always_inline void tt_state(void *ctx, u64 sk, u8 old, u8 new, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_hit h = {
        .sk = sk, .id = bpf_get_current_pid_tgid(), .ts = bpf_ktime_get_ns(),
        .old = old, .new = new, .owner = TT_OWNER_STEP(old, new),
        .opening = TT_OPENING_STEP(old, new), .send = TT_SEND_AT(new),
    };
    if (new == TT_SYN_SENT)
        tt_connect_syn_sent(h.id, sk);
    struct tt_event *e = tt_pending(ctx, &h);
    if (e)
        tt_update(e, &h, s);
    else
        e = tt_start(ctx, &h, s);
    if (e)
        tt_add_step(ctx, e, &h);
}
