/* Filling a tt_event (tcptrace.h): the task current at the hit, and the socket's fields. Part of
 * tcptrace.c. */

/* The socket fields the tracepoints report, in the record's layout: from the tracepoint record
 * (TT_SK_FROM_ARGS, tcptrace.c), or read from the socket (raw.c). */
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

/* A socket's network namespace (the inode number of its struct net, as /proc/<pid>/ns/net
 * shows it), family and local port, all 0 where unknown. */
struct tt_sock_id {
    u32 netns;
    u16 family;
    u16 port;         /* host byte order (skc_num) */
};

#ifdef TT_SOCK_ID
/* Read at offsets from the running kernel's BTF (tcptrace/kernel/probes.py: SOCK_ID_FIELDS),
 * never through the compile-time headers, which may be another kernel's. */
static __always_inline u32 tt_netns(u64 sk)
{
    u64 net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk + TT_OFF_NET));
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + TT_OFF_NET_INUM));
    return inum;
}

static __always_inline void tt_sock_id(u64 sk, struct tt_sock_id *id)
{
    id->netns = tt_netns(sk);
    bpf_probe_read_kernel(&id->family, sizeof(id->family), (void *)(sk + TT_OFF_FAMILY));
    bpf_probe_read_kernel(&id->port, sizeof(id->port), (void *)(sk + TT_OFF_NUM));
}
#else
/* Without BTF, user space matches listeners and their facts by address and port alone. */
static __always_inline u32 tt_netns(u64 sk) { return 0; }
static __always_inline void tt_sock_id(u64 sk, struct tt_sock_id *id) {}
#endif

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
