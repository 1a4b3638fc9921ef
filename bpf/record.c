/* Filling a tt_event (tcptrace.h): the task current at the hit, and the socket's fields. Part of
 * tcptrace.c. */

/* The socket fields the tracepoints report, in the record's layout: from the tracepoint record
 * (TT_SK_FROM_ARGS, tcptrace.c), or, in a rescue, read from the socket (rescue.c). */
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
