/* The facts that explain a failed or broken connection: resets received, error reports, SYN
 * retransmissions. While a socket has steps pending (state.c, hold.c) a reset or a
 * retransmission is counted in that record (`rst_ns`, `retrans`) instead of a record of its own.
 * Part of tcptrace.c; the programs calling these are in raw.c, or, without BTF, tcptrace.c. */

#ifdef TT_HOOK_RECV_RESET
static __always_inline void tt_recv_reset(void *ctx, u64 sk, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_event *e = socks.lookup(&sk);
    if (!e)
        e = tt_held(sk);            /* the transition the reset makes carries it out */
    if (e) {
        if (!e->rst_ns)
            e->rst_ns = bpf_ktime_get_ns();
        return;
    }
    struct tt_event ev = {};
    tt_fact(&ev, TT_RECV_RESET, sk, s);
    tt_emit(ctx, &ev);
}
#endif

#ifdef TT_HOOK_SOCK_ERROR
/* TCP only (the caller checked). The record names no socket (the regular tracepoint has no sock
 * pointer; `sk` is 0 there): user space matches the report by its addresses and ports. Not
 * sent: reports of no error (tcp_disconnect() reports one as a failed connect() tears its socket
 * down, one a connection), and a refused or failed connect's report of the errno its CLOSE
 * record carried (state.c: `told`): user space learns nothing from either, and a refused connect
 * would cost three records instead of one. */
static __always_inline void tt_sock_error(void *ctx, u64 sk, int err, struct tt_sk *s)
{
    if (!err || tt_told_before(sk, err) || !tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_event ev = {};
    tt_fact(&ev, TT_SOCK_ERROR, 0, s);
    ev.err = err;
    tt_emit(ctx, &ev);
}
#endif

#ifdef TT_HOOK_RETRANS
/* SYN retransmissions only (the caller checked the state): data retransmits are a different
 * tool's business and can be numerous enough to cost real overhead. */
static __always_inline void tt_retrans(void *ctx, u64 sk, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_event *e = socks.lookup(&sk);
    if (e) {                        /* counted with the socket's pending CLOSE->SYN_SENT */
        if (e->retrans < 255)
            e->retrans++;
        return;
    }
    struct tt_event ev = {};
    tt_fact(&ev, TT_RETRANS, sk, s);
    ev.oldstate = TT_SYN_SENT;
    tt_emit(ctx, &ev);
}
#endif
