/* The programs on raw tracepoints, where the running kernel's BTF gives the struct sock offsets
 * they read (TT_RESCUE): the plan every kernel with BTF gets. Part of tcptrace.c, after the
 * handlers they call (state.c, facts.c); without BTF, tcptrace.c's tracepoint programs call the
 * same handlers with the tracepoint's record instead.
 *
 * Raw, not regular tracepoint programs, for two reasons. A regular one runs through
 * trace_call_bpf(), which skips it (a recursion miss) whenever the CPU's bpf_prog_active is
 * taken: by any kprobe or tracepoint BPF program running there (ours or another tool's), and by
 * every bpf(2) map operation (bpf_disable_instrumentation(); tcptrace's own read of `socks`
 * walks all its buckets that way), so a softirq interrupting one of those makes transitions no
 * regular program sees. A raw tracepoint program is skipped for that only when it would
 * re-enter itself on a CPU: a hit in a softirq that interrupts the program. And it costs less:
 * the kernel builds no trace record and no perf context for it (on a host where kernel entry is
 * expensive the workload kept 0.71-0.73 of its untraced rate flat out, 0.695 with regular
 * programs; docs/man/overhead.md). Some hits still get no BPF run of either kind, uncounted by
 * the kernel: the tally finds them (tcptrace/kernel/losses.py, `unseen:`).
 *
 * Those re-entry skips remain (about 4 in 1,000 connections at 20k/s), so each hook has a second
 * raw program, the twin, attached after the first (tcptrace/kernel/loader.py): it runs on every
 * hit, finds the mark the first program left for the hit, or, finding none, knows the program
 * was skipped and does its work. The twin cannot be skipped with it: it runs after the program
 * at the same level, so it is running only when the program is not. */

/* A kernel member read. A typed tracepoint program (TT_TYPED: tp_btf, loaded by
 * tcptrace/kernel/loader.py) gets the socket as a BTF pointer and loads from it directly: the
 * verifier checks the load against the struct's layout, and a fault is fixed up as a probe read's
 * would be, without the helper call (about 20 ns a read on a host where calls are dear:
 * docs/bench.md). A raw tracepoint program's argument is a plain number: a probe read. */
#ifdef TT_TYPED
#define TT_READ(type, addr) (*(type *)(addr))
#else
#define TT_READ(type, addr)                                                        \
    ({ type v_ = 0; bpf_probe_read_kernel(&v_, sizeof(v_), (void *)(addr)); v_; })
#endif

#ifdef TT_RESCUE_ONLY
/* Tests only: the first program steps aside and the twin handles every hit, so the rescue path
 * meets real sockets (tests/kernel/test_foundation.py). */
#define TT_STEP_ASIDE() return 0
#else
#define TT_STEP_ASIDE()
#endif

/* marks: per kind, per CPU, per level, the hit the first program took last: what the twin looks
 * for. Written by every run of a first program, consumed (zeroed) by the twin that finds it.
 * Per level (task or interrupt), because hits nest only through interrupts: a softirq can run
 * between a task-level hit's two programs, and its own hits (both programs each) complete before
 * the task level resumes. Within a level a hit's programs run back to back with preemption off,
 * so one slot each is exact, where a ring of recent marks shared by the levels is not
 * (docs/design.md, "Raw tracepoints and the rescue"). */
struct tt_mark {
    u64 sk[2];      /* per level: the hit's socket */
    u32 pair[2];    /* and for a state hit its transition (old << 4 | new), else 0: kept apart
                     * from the socket, since a typed tracepoint's socket is a pointer to the
                     * verifier, which refuses mixing a variable into one (6.1) */
};
BPF_PERCPU_ARRAY(marks, struct tt_mark, TT_KIND_MAX);
/* rescued: per kind, per CPU, hits the twin handled because the first program was skipped;
 * incremented by the twins, never reset. User space subtracts them from the first programs'
 * recursion misses. */
BPF_PERCPU_ARRAY(rescued, u64, TT_KIND_MAX);

/* A pointer's value as a number (the verifier keeps a pointer a pointer). */
static __always_inline u64 tt_addr(void *p)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), &p);
    return v;
}

/* Which level a hit runs at, from its argument array (ctx), which the kernel builds on the stack
 * the hit runs on: 0 on the current task's stack (process context, or ksoftirqd, which nothing
 * interrupts with hits), 1 on an interrupt stack (a softirq, run from an interrupt or from
 * local_bh_enable(): both switch to the CPU's IRQ stack). Not the program's own frame: since
 * 6.13 a BPF program may run on a private per-CPU stack. TT_OFF_TASK_STACK is
 * task_struct.stack, TT_SZ_STACK THREAD_SIZE (from BTF). */
static __always_inline u32 tt_level(void *ctx)
{
#ifdef TT_TYPED
    u64 stack = TT_READ(u64, (u64)bpf_get_current_task_btf() + TT_OFF_TASK_STACK);
#else
    u64 stack = TT_READ(u64, bpf_get_current_task() + TT_OFF_TASK_STACK);
#endif
    return tt_addr(ctx) - stack < TT_SZ_STACK ? 0 : 1;
}

static __always_inline void tt_mark(void *ctx, u32 kind, u64 sk, u32 pair)
{
    struct tt_mark *m = marks.lookup(&kind);
    if (m) {
        u32 level = tt_level(ctx) & 1;
        m->sk[level] = sk;
        m->pair[level] = pair;
    }
}

/* The twin's test: 1 if the first program took this hit (its mark is consumed), 0 if the twin
 * must do the work (counted as a rescue). The twin looks at both levels' marks rather than work
 * out its own level (two helper calls on every hit): a mark names one hit, and the two slots
 * never hold the same hit, so whichever matches is this hit's own. A mark left unconsumed (its
 * twin skipped, which loses nothing) is overwritten by that level's next hit. */
static __always_inline int tt_taken(u32 kind, u64 sk, u32 pair)
{
    struct tt_mark *m = marks.lookup(&kind);
    if (!m)
        return 1;                   /* cannot tell: never risk a duplicate */
    if (m->sk[0] == sk && m->pair[0] == pair) {
        m->sk[0] = 0;
        return 1;
    }
    if (m->sk[1] == sk && m->pair[1] == pair) {
        m->sk[1] = 0;
        return 1;
    }
    u64 *n = rescued.lookup(&kind);
    if (n)
        (*n)++;
    return 0;
}

/* The address to read a TCP socket's inet_sock members at (its local address and port), or 0
 * if the socket is not TCP. Typed: bpf_skc_to_tcp_sock(), which checks the protocol and gives a
 * pointer the verifier lets reach past struct sock (inet_sock, tcp_sock); raw: the socket itself
 * once its protocol, read, says TCP. */
static __always_inline u64 tt_tcp(u64 sk)
{
#ifdef TT_TYPED
    return (u64)bpf_skc_to_tcp_sock((void *)sk);
#else
    return TT_READ(u16, sk + TT_OFF_PROTOCOL) == TT_IPPROTO_TCP ? sk : 0;
#endif
}

/* What the tracepoints' TP_fast_assign reads: family and ports from sock_common and inet_sock,
 * inet_saddr / skc_daddr for IPv4, the skc_v6 pair for IPv6 (`inet` from tt_tcp). Typed, each
 * member is loaded on its own; raw, each group of members that lie together (TT_SPAN_*:
 * tcptrace/kernel/probes.py, RESCUE_SPANS) in one probe read. */
#ifdef TT_TYPED
static __always_inline void tt_read_sk(u64 sk, u64 inet, struct tt_sk *s)
{
    u32 a;
    s->family = TT_READ(u16, sk + TT_OFF_FAMILY);
    s->sport = ntohs(TT_READ(u16, inet + TT_OFF_SPORT));
    s->dport = ntohs(TT_READ(u16, sk + TT_OFF_DPORT));
    if (s->family == AF_INET) {
        a = TT_READ(u32, inet + TT_OFF_SADDR);
        __builtin_memcpy(s->saddr, &a, 4);
        a = TT_READ(u32, sk + TT_OFF_DADDR);
        __builtin_memcpy(s->daddr, &a, 4);
    } else {
        u64 w[2];
        w[0] = TT_READ(u64, sk + TT_OFF_V6_SADDR);
        w[1] = TT_READ(u64, sk + TT_OFF_V6_SADDR + 8);
        __builtin_memcpy(s->saddr, w, 16);
        w[0] = TT_READ(u64, sk + TT_OFF_V6_DADDR);
        w[1] = TT_READ(u64, sk + TT_OFF_V6_DADDR + 8);
        __builtin_memcpy(s->daddr, w, 16);
    }
}
#else
#define TT_COMMON(off) (common + (off) - TT_SPAN_COMMON_LO)
#define TT_INET(off) (inet_ + (off) - TT_SPAN_INET_LO)
static __always_inline void tt_read_sk(u64 sk, u64 inet, struct tt_sk *s)
{
    u8 common[TT_SPAN_COMMON_LEN] = {}, inet_[TT_SPAN_INET_LEN] = {};
    u16 port;
    bpf_probe_read_kernel(common, TT_SPAN_COMMON_LEN, (void *)(sk + TT_SPAN_COMMON_LO));
    bpf_probe_read_kernel(inet_, TT_SPAN_INET_LEN, (void *)(inet + TT_SPAN_INET_LO));
    __builtin_memcpy(&s->family, TT_COMMON(TT_OFF_FAMILY), 2);
    __builtin_memcpy(&port, TT_INET(TT_OFF_SPORT), 2);
    s->sport = ntohs(port);
    __builtin_memcpy(&port, TT_COMMON(TT_OFF_DPORT), 2);
    s->dport = ntohs(port);
    if (s->family == AF_INET) {
        __builtin_memcpy(s->saddr, TT_INET(TT_OFF_SADDR), 4);
        __builtin_memcpy(s->daddr, TT_COMMON(TT_OFF_DADDR), 4);
    } else {
        bpf_probe_read_kernel(s->saddr, 16, (void *)(sk + TT_OFF_V6_SADDR));
        bpf_probe_read_kernel(s->daddr, 16, (void *)(sk + TT_OFF_V6_DADDR));
    }
}
#endif

/* Each hook: what names a hit besides its socket (tt_pair_state or tt_pair_none) and its work
 * (tt_do_<hook>), which both programs share.
 * TT_PROGRAMS defines the two, attached by name in this order (tcptrace/kernel/loader.py: HOOKS):
 * tt_prog_<hook>, which counts the hit, marks it and does the work (and, on state hits, sends
 * held opens that are due: hold.c, whose buffer only this program uses, and the kernel never
 * runs it twice at once on a CPU); tt_rescue_<hook>, the twin. */
#define TT_PROGRAMS(hook, kind, pair)                                                \
    int tt_prog_##hook(struct bpf_raw_tracepoint_args *ctx)                         \
    {                                                                               \
        tt_hit(kind);                                                               \
        TT_STEP_ASIDE();                                                            \
        tt_mark(ctx, kind, ctx->args[0], pair(ctx));                                \
        tt_do_##hook(ctx);                                                          \
        if (kind == TT_STATE)                                                       \
            tt_flush(ctx);                                                          \
        return 0;                                                                   \
    }                                                                               \
    int tt_rescue_##hook(struct bpf_raw_tracepoint_args *ctx)                       \
    {                                                                               \
        if (!tt_taken(kind, ctx->args[0], pair(ctx)))                               \
            tt_do_##hook(ctx);                                                      \
        return 0;                                                                   \
    }

/* The other hooks' hits: their socket alone (marks are per kind, and no hook fires twice for a
 * socket at once). */
static __always_inline u32 tt_pair_none(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}

/* inet_sock_set_state(sk, oldstate, newstate): the socket and its transition */
static __always_inline u32 tt_pair_state(struct bpf_raw_tracepoint_args *ctx)
{
    return ((u32)(u8)ctx->args[1] << 4) | (u8)ctx->args[2];
}

static __always_inline void tt_do_state(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0], inet = tt_tcp(sk);
    if (!inet)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, inet, &s);
    tt_state(ctx, sk, ctx->args[1], ctx->args[2], &s);
}
TT_PROGRAMS(state, TT_STATE, tt_pair_state)

#ifdef TT_HOOK_RECV_RESET
/* tcp_receive_reset(sk) */
static __always_inline void tt_do_recv_reset(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0], inet = tt_tcp(sk);
    if (!inet)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, inet, &s);
    tt_recv_reset(ctx, sk, &s);
}
TT_PROGRAMS(recv_reset, TT_RECV_RESET, tt_pair_none)
#endif

#ifdef TT_HOOK_SOCK_ERROR
/* inet_sk_error_report(sk): the errno is the socket's sk_err. */
static __always_inline void tt_do_sock_error(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0], inet = tt_tcp(sk);
    if (!inet)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, inet, &s);
    tt_sock_error(ctx, sk, TT_READ(int, sk + TT_OFF_ERR), &s);
}
TT_PROGRAMS(sock_error, TT_SOCK_ERROR, tt_pair_none)
#endif

#ifdef TT_HOOK_RETRANS
/* tcp_retransmit_skb(sk, skb[, reason]): SYN retransmissions only (facts.c). */
static __always_inline void tt_do_retrans(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0], inet;
    if (TT_READ(u8, sk + TT_OFF_STATE) != TT_SYN_SENT || !(inet = tt_tcp(sk)))
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, inet, &s);
    tt_retrans(ctx, sk, &s);
}
TT_PROGRAMS(retrans, TT_RETRANS, tt_pair_none)
#endif
