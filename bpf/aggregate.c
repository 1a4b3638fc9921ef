/* Healthy short connections, folded: when user space asks (config.fold: `report` and `metrics`,
 * `watch --only` without connect, accept or close), a socket whose whole life is one ordinary
 * record (a connect() or an accept, ESTABLISHED, a normal four-way close, no SYN retransmitted,
 * no reset, its opening never sent early) is added to per-key counters here instead of being
 * sent. What a user reads of such a connection in a table or a metric is its key's counts and
 * handshake histogram; everything unusual still comes as records and goes through the
 * detectors. Part of tcptrace.c; state.c calls tt_fold where it would send the record. */

#ifndef TT_AGG_MAX
#define TT_AGG_MAX 4096
#endif
/* agg: per key (destination or local service, owner command, shape), cumulative, per CPU (no
 * atomic adds on a shared line). Keys are never deleted: at most TT_AGG_MAX are made (counted
 * in agg_keys), then a connection goes to its shape's "other" key, so the counts stay exact
 * whatever the number of destinations; the room above TT_AGG_MAX is for those four and for
 * CPUs racing past the bound. Preallocated: an insert on the hit's path allocates nothing. */
BPF_F_TABLE("percpu_hash", struct tt_agg_key, struct tt_agg, agg, TT_AGG_MAX + 64, 0);
/* agg_keys: keys made (one entry, shared; an atomic add per new key only). */
BPF_ARRAY(agg_keys, u64, 1);
/* agg_zero: a zeroed value to insert from (the stack has no room for one); never written. */
BPF_PERCPU_ARRAY(agg_zero, struct tt_agg, 1);

/* The shape of a whole-life record (5 steps: the opening's two, the close's three), or -1 if
 * it is anything else. */
static __always_inline int tt_shape(struct tt_event *e)
{
    int shape = 0;
    if (e->step_old[0] == TT_LISTEN && e->step_new[0] == TT_SYN_RECV)
        shape = TT_AGG_PASSIVE;
    else if (!(e->step_old[0] == TT_CLOSE && e->step_new[0] == TT_SYN_SENT))
        return -1;
    if (e->step_new[1] != TT_ESTABLISHED || e->step_old[2] != TT_ESTABLISHED ||
        e->step_new[4] != TT_CLOSE)
        return -1;
    if (e->step_new[2] == TT_FIN_WAIT1 && e->step_new[3] == TT_FIN_WAIT2 &&
        e->step_old[4] == TT_FIN_WAIT2)
        return shape;
    if (e->step_new[2] == TT_CLOSE_WAIT && e->step_new[3] == TT_LAST_ACK &&
        e->step_old[4] == TT_LAST_ACK)
        return shape | TT_AGG_REMOTE;
    return -1;
}

/* Fold the record e, complete at its CLOSE, into `agg` if it is a healthy connection and user
 * space asked for it: 1 if folded (not to be sent), 0 if it must be sent. */
static __always_inline int tt_fold(struct tt_event *e)
{
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    if (!c || !c->fold || e->nsteps != 5 || e->retrans || e->rst_ns)
        return 0;
    /* The owner known (a close() or shutdown() in the record), and a life shorter than half
     * the hold time: then no step of it reached user space on its own. An early copy goes out
     * only once a socket has been held hold_us (the margin covers one being made on another
     * CPU while this close runs), and user space applies a scan of `socks` that shows an
     * opening only once it is that old (tcptrace/kernel/source.py: scan). */
    if ((e->flags & (TT_F_OWNER | TT_F_HELD)) != TT_F_OWNER)
        return 0;
    if (e->step_ts[4] - e->step_ts[0] >= (u64)c->hold_us * 500)
        return 0;
    int shape = tt_shape(e);
    if (shape < 0)
        return 0;
    struct tt_agg_key k = {};
    k.family = e->family;
    k.shape = shape;
    if (shape & TT_AGG_PASSIVE) {
        k.port = e->sport;
        __builtin_memcpy(k.addr, e->saddr, 16);
    } else {
        k.port = e->dport;
        __builtin_memcpy(k.addr, e->daddr, 16);
    }
    __builtin_memcpy(k.comm, e->comm, 16);
    struct tt_agg *a = agg.lookup(&k);
    if (!a) {
        u64 *made = agg_keys.lookup(&zero);
        struct tt_agg *z = agg_zero.lookup(&zero);
        if (!made || !z)
            return 0;
        if (*made >= TT_AGG_MAX) {
            __builtin_memset(&k, 0, sizeof(k));
            k.family = e->family;
            k.shape = shape | TT_AGG_OTHER;
        }
        /* fails when the key exists: another CPU made it meanwhile, or "other" is in use */
        if (agg.insert(&k, z) == 0 && !(k.shape & TT_AGG_OTHER))
            __sync_fetch_and_add(made, 1);
        a = agg.lookup(&k);
        if (!a)
            return 0;               /* the map is full after all: sent as a record */
    }
    /* Per CPU, but a twin (raw.c) may interrupt this program on its CPU and
     * fold into the same value: adds are atomic so neither is lost. */
    __sync_fetch_and_add(&a->count, 1);
    __sync_fetch_and_add(&a->life_sum, e->step_ts[4] - e->step_ts[0]);
    if (!(shape & TT_AGG_PASSIVE)) {
        u64 hs = e->step_ts[1] - e->step_ts[0];
        __sync_fetch_and_add(&a->hs_sum, hs);
        if (hs > a->hs_max)
            a->hs_max = hs;
        u32 b = tt_hbucket(hs);
        if (b < TT_H_N)
            __sync_fetch_and_add(&a->hs[b], 1);
    }
    return 1;
}
