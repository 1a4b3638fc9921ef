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

/* What identifies a hit to both programs (marks are per kind): the socket, and for a state hit
 * the transition too. Sockets lie more than 256 bytes apart, so the states can share the
 * pointer's word. */
#define TT_ID_STATE(sk, old, new) ((u64)(sk) ^ (((u64)(old) << 4) | (new)))

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
    u64 took[2];
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
    u64 stack = 0;
    bpf_probe_read_kernel(&stack, sizeof(stack),
                          (void *)(bpf_get_current_task() + TT_OFF_TASK_STACK));
    return tt_addr(ctx) - stack < TT_SZ_STACK ? 0 : 1;
}

static __always_inline void tt_mark(void *ctx, u32 kind, u64 id)
{
    struct tt_mark *m = marks.lookup(&kind);
    if (m)
        m->took[tt_level(ctx) & 1] = id;
}

/* The twin's test: 1 if the first program took this hit (its mark is consumed), 0 if the twin
 * must do the work (counted as a rescue). The twin looks at both levels' marks rather than work
 * out its own level (two helper calls on every hit): a mark names one hit, and the two slots
 * never hold the same hit, so whichever matches is this hit's own. A mark left unconsumed (its
 * twin skipped, which loses nothing) is overwritten by that level's next hit. */
static __always_inline int tt_taken(u32 kind, u64 id)
{
    struct tt_mark *m = marks.lookup(&kind);
    if (!m)
        return 1;                   /* cannot tell: never risk a duplicate */
    if (m->took[0] == id) {
        m->took[0] = 0;
        return 1;
    }
    if (m->took[1] == id) {
        m->took[1] = 0;
        return 1;
    }
    u64 *n = rescued.lookup(&kind);
    if (n)
        (*n)++;
    return 0;
}

/* What the tracepoints' TP_fast_assign reads: family and ports from sock_common and inet_sock,
 * inet_saddr / skc_daddr for IPv4, the skc_v6 pair for IPv6. Each group of members that lie
 * together (TT_SPAN_*: tcptrace/kernel/probes.py, RESCUE_SPANS) in one probe read. */
#define TT_COMMON(off) (common + (off) - TT_SPAN_COMMON_LO)
#define TT_INET(off) (inet + (off) - TT_SPAN_INET_LO)
static __always_inline void tt_read_sk(u64 sk, struct tt_sk *s)
{
    u8 common[TT_SPAN_COMMON_LEN] = {}, inet[TT_SPAN_INET_LEN] = {};
    u16 port;
    bpf_probe_read_kernel(common, TT_SPAN_COMMON_LEN, (void *)(sk + TT_SPAN_COMMON_LO));
    bpf_probe_read_kernel(inet, TT_SPAN_INET_LEN, (void *)(sk + TT_SPAN_INET_LO));
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

static __always_inline u16 tt_read_protocol(u64 sk)
{
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, 2, (void *)(sk + TT_OFF_PROTOCOL));
    return proto;
}

/* Each hook: what names a hit (tt_id_state or tt_id_sk) and its work (tt_do_<hook>), which both
 * programs share.
 * TT_PROGRAMS defines the two, attached by name in this order (tcptrace/kernel/loader.py: HOOKS):
 * tt_prog_<hook>, which counts the hit, marks it and does the work (and, on state hits, sends
 * held opens that are due: hold.c, whose buffer only this program uses, and the kernel never
 * runs it twice at once on a CPU); tt_rescue_<hook>, the twin. */
#define TT_PROGRAMS(hook, kind, id)                                                  \
    int tt_prog_##hook(struct bpf_raw_tracepoint_args *ctx)                         \
    {                                                                               \
        tt_hit(kind);                                                               \
        TT_STEP_ASIDE();                                                            \
        tt_mark(ctx, kind, id(ctx));                                                \
        tt_do_##hook(ctx);                                                          \
        if (kind == TT_STATE)                                                       \
            tt_flush(ctx);                                                          \
        return 0;                                                                   \
    }                                                                               \
    int tt_rescue_##hook(struct bpf_raw_tracepoint_args *ctx)                       \
    {                                                                               \
        if (!tt_taken(kind, id(ctx)))                                               \
            tt_do_##hook(ctx);                                                      \
        return 0;                                                                   \
    }

/* The other hooks' hits: their socket (marks are per kind, and no hook fires twice for a socket
 * at once). */
static __always_inline u64 tt_id_sk(struct bpf_raw_tracepoint_args *ctx)
{
    return ctx->args[0];
}

/* inet_sock_set_state(sk, oldstate, newstate) */
static __always_inline u64 tt_id_state(struct bpf_raw_tracepoint_args *ctx)
{
    return TT_ID_STATE(ctx->args[0], (u8)ctx->args[1], (u8)ctx->args[2]);
}

static __always_inline void tt_do_state(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    if (tt_read_protocol(sk) != TT_IPPROTO_TCP)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_state(ctx, sk, ctx->args[1], ctx->args[2], &s);
}
TT_PROGRAMS(state, TT_STATE, tt_id_state)

#ifdef TT_HOOK_RECV_RESET
/* tcp_receive_reset(sk) */
static __always_inline void tt_do_recv_reset(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_recv_reset(ctx, sk, &s);
}
TT_PROGRAMS(recv_reset, TT_RECV_RESET, tt_id_sk)
#endif

#ifdef TT_HOOK_SOCK_ERROR
/* inet_sk_error_report(sk): the errno is the socket's sk_err. */
static __always_inline void tt_do_sock_error(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    if (tt_read_protocol(sk) != TT_IPPROTO_TCP)
        return;
    struct tt_sk s = {};
    int err = 0;
    tt_read_sk(sk, &s);
    bpf_probe_read_kernel(&err, 4, (void *)(sk + TT_OFF_ERR));
    tt_sock_error(ctx, err, &s);
}
TT_PROGRAMS(sock_error, TT_SOCK_ERROR, tt_id_sk)
#endif

#ifdef TT_HOOK_RETRANS
/* tcp_retransmit_skb(sk, skb[, reason]): SYN retransmissions only (facts.c). */
static __always_inline void tt_do_retrans(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    u8 state = 0;
    bpf_probe_read_kernel(&state, 1, (void *)(sk + TT_OFF_STATE));
    if (state != TT_SYN_SENT)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_retrans(ctx, sk, &s);
}
TT_PROGRAMS(retrans, TT_RETRANS, tt_id_sk)
#endif
