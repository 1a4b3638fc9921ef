/* Listener facts: what the kernel itself says about a listening socket under pressure.
 *   tcp:tcp_retransmit_synack  a SYN-ACK retransmitted: a half-open connection that does not
 *                              complete (a SYN flood, or clients whose final ACK is lost). One
 *                              record each (TT_SYNACK): the listener, the request's 4-tuple.
 *   skb:kfree_skb              with reason TCP_LISTEN_OVERFLOW, a final ACK dropped because the
 *                              listener's accept queue was full (tcp_v4_syn_recv_sock). Counted
 *                              per listener in `overflows`, read by user space on a timer: the
 *                              hook sees every dropped packet of the host.
 * SYNs the kernel drops because a queue is full fire no tracepoint at all; user space reads those
 * from the namespace's counters (tcptrace/host/samplers.py). Part of tcptrace.c. */

#ifdef TT_HOOK_SYNACK
/* The tracepoint's skaddr is the listener; its ports and addresses are the request's (local
 * side first: the address the SYN was sent to, the listener's port). */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    struct tt_sk s = {};
    TT_SK_FROM_ARGS(&s, args);
    if (!tt_wanted(s.family, s.sport, s.dport))
        return 0;
    struct tt_event ev = {};
    tt_fact(&ev, TT_SYNACK, (u64)args->skaddr, &s);
    struct tt_sock_id id = {};
    tt_sock_id((u64)args->skaddr, &id);
    ev.aux = id.netns;
    tt_emit(args, &ev);
    return 0;
}
#endif

#ifdef TT_LISTEN_OVERFLOW
struct tt_overflow {
    u64 drops;                  /* final ACKs dropped, accept queue full; only ever grows */
    struct tt_sock_id id;
};
/* overflows: per listening socket (rx_sk, an opaque key), its TCP_LISTEN_OVERFLOW drops.
 * Inserted at a listener's first such drop, never deleted; LRU, so it stays bounded by the
 * listeners that overflowed lately. User space reads it every 100 ms (kernel/source.py:
 * KernelSource.overflows) and takes differences; an entry evicted and made again starts from
 * 0, which user space sees as a count that went down. */
BPF_TABLE("lru_hash", u64, struct tt_overflow, overflows, 1024);

/* A raw tracepoint: the regular one's record has an `enum skb_drop_reason` member that headers
 * of another kernel cannot lay out, and a raw program costs less on a hook this hot. Which raw
 * argument is which (they changed over time) and the reason's number come from the running
 * kernel's BTF (probes.py: overflow_args). */
RAW_TRACEPOINT_PROBE(kfree_skb)
{
    if ((u32)ctx->args[TT_KFREE_REASON_ARG] != TT_REASON_LISTEN_OVERFLOW)
        return 0;                           /* every other drop of the host: nothing more */
    u64 sk = ctx->args[TT_KFREE_SK_ARG];
    if (!sk || !tt_config())
        return 0;
    struct tt_overflow *o = overflows.lookup(&sk);
    if (!o) {
        struct tt_overflow n = {};
        tt_sock_id(sk, &n.id);
        if (n.id.family && !tt_wanted(n.id.family, n.id.port, 0))
            return 0;
        overflows.insert(&sk, &n);          /* fails if another CPU inserted it first */
        o = overflows.lookup(&sk);
        if (!o)
            return 0;
    }
    __sync_fetch_and_add(&o->drops, 1);
    return 0;
}
#endif
