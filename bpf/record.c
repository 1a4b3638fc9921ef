/* Filling a tt_event (tcptrace.h): the task current at the hit, and the socket's fields. Part of
 * tcptrace.c. */

/* The socket fields the tracepoints report, in the record's layout: from the tracepoint record
 * (TT_SK_FROM_ARGS), or read from the socket (tt_read_sk). */
struct tt_sk {
    u16 family;
    u16 sport;        /* host byte order */
    u16 dport;
    u16 _pad;
    u8  saddr[16];    /* IPv4 in the first 4 bytes */
    u8  daddr[16];
};

/* The socket fields of a tracepoint record (sock:inet_sock_set_state, tcp:tcp_receive_reset,
 * sock:inet_sk_error_report, tcp:tcp_retransmit_skb and tcp:tcp_retransmit_synack name them
 * alike) as a tt_sk. */
#define TT_SK_FROM_ARGS(s, args)                                                    \
    do {                                                                            \
        (s)->family = (args)->family;                                               \
        (s)->sport = (args)->sport;                                                 \
        (s)->dport = (args)->dport;                                                 \
        if ((args)->family == AF_INET) {                                            \
            __builtin_memcpy((s)->saddr, (args)->saddr, 4);                         \
            __builtin_memcpy((s)->daddr, (args)->daddr, 4);                         \
        } else {                                                                    \
            __builtin_memcpy((s)->saddr, (args)->saddr_v6, 16);                     \
            __builtin_memcpy((s)->daddr, (args)->daddr_v6, 16);                     \
        }                                                                           \
    } while (0)

#if defined(TT_STATE_RAW) || defined(TT_RESCUE)
/* The same fields read from the socket, for a program that has no tracepoint record (the raw
 * state hook, state_raw.c, and the rescue's twins, rescue.c), at offsets from the running
 * kernel's BTF (TT_OFF_*): what TP_fast_assign reads, family and ports from sock_common and
 * inet_sock, inet_saddr / skc_daddr for IPv4, the skc_v6 pair for IPv6. Every read is a helper
 * call, and calls are dear where retpolines and Safe-RET guard them, so skc_dport and
 * skc_family, a few bytes apart in sock_common (4 on 6.1 and 6.18), are read as one. */
static __always_inline void tt_read_sk(u64 sk, struct tt_sk *s)
{
    u16 port = 0;
    bpf_probe_read_kernel(&port, 2, (void *)(sk + TT_OFF_SPORT));
    s->sport = ntohs(port);
#if TT_OFF_FAMILY > TT_OFF_DPORT && TT_OFF_FAMILY - TT_OFF_DPORT <= 14
    u16 span[(TT_OFF_FAMILY - TT_OFF_DPORT) / 2 + 1] = {};
    bpf_probe_read_kernel(span, sizeof(span), (void *)(sk + TT_OFF_DPORT));
    s->dport = ntohs(span[0]);
    s->family = span[(TT_OFF_FAMILY - TT_OFF_DPORT) / 2];
#else
    bpf_probe_read_kernel(&s->family, 2, (void *)(sk + TT_OFF_FAMILY));
    port = 0;
    bpf_probe_read_kernel(&port, 2, (void *)(sk + TT_OFF_DPORT));
    s->dport = ntohs(port);
#endif
    if (s->family == AF_INET) {
        bpf_probe_read_kernel(s->saddr, 4, (void *)(sk + TT_OFF_SADDR));
        bpf_probe_read_kernel(s->daddr, 4, (void *)(sk + TT_OFF_DADDR));
    } else {
        bpf_probe_read_kernel(s->saddr, 16, (void *)(sk + TT_OFF_V6_SADDR));
        bpf_probe_read_kernel(s->daddr, 16, (void *)(sk + TT_OFF_V6_DADDR));
    }
}

static __always_inline u16 tt_read_protocol(u64 sk)
{
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, 2, (void *)(sk + TT_OFF_PROTOCOL));
    return proto;
}
#endif

static __always_inline void tt_put_sk(struct tt_event *ev, struct tt_sk *s)
{
    ev->family = s->family;
    ev->sport = s->sport;
    ev->dport = s->dport;
    __builtin_memcpy(ev->saddr, s->saddr, 16);
    __builtin_memcpy(ev->daddr, s->daddr, 16);
}

/* The current task. In softirq (every transition the network causes) this is whichever task was
 * interrupted, not the socket's owner: user space decides which transitions name the owner. */
static __always_inline void tt_set_task(struct tt_event *ev, u64 id)
{
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
}

static __always_inline void tt_task(struct tt_event *ev)
{
    ev->ts_ns = bpf_ktime_get_ns();
    tt_set_task(ev, bpf_get_current_pid_tgid());
}

/* Is the current task (id: pid_tgid) another than the one record e names (pid, tid and comm)? */
static __always_inline int tt_other_task(struct tt_event *e, u64 id)
{
    if (e->pid != (u32)(id >> 32) || e->tid != (u32)id)
        return 1;
    u64 comm[2] = {};
    bpf_get_current_comm(comm, sizeof(comm));
    u64 *had = (u64 *)e->comm;
    return comm[0] != had[0] || comm[1] != had[1];
}

/* A record of one fact (not TT_STATE) about socket sk (0 when the hook names none), told by the
 * current task. */
static __always_inline void tt_fact(struct tt_event *ev, u8 kind, u64 sk, struct tt_sk *s)
{
    ev->kind = kind;
    tt_task(ev);
    ev->skaddr = sk;
    tt_put_sk(ev, s);
}
