/* The recursion rescue. A tracepoint program runs through trace_call_bpf(), which skips it (and
 * counts a recursion miss) whenever the CPU's bpf_prog_active is taken: by any kprobe or
 * tracepoint BPF program running there (ours or another tool's), and by every bpf(2) map
 * operation user space makes (bpf_disable_instrumentation(); reading the `socks` map walks all
 * its buckets that way). A softirq that interrupts one of those makes transitions that were
 * lost. Raw tracepoint programs are not subject to that check. So each tracepoint program first
 * writes a mark naming the hit (per CPU and level, see `marks`), and two raw tracepoint twins on
 * the same hook, running after it, find the mark, or, finding none, know the program was skipped
 * and do its work.
 * The twin has no tracepoint record, so it reads the socket's fields itself, at offsets from the
 * running kernel's BTF (never from the compile-time headers, which may be another version's).
 * Part of tcptrace.c, after the handlers the twins call (state.c, facts.c). */

/* What identifies a hit to both a tracepoint program and its twin. Sockets lie more than 256
 * bytes apart, so the states can share the pointer's word; bit 63 keeps an id from being 0 (an
 * empty mark). sock_error has no socket pointer in its record: ports and errno stand in. */
#define TT_ID_STATE(sk, old, new) ((u64)(sk) ^ (((u64)(old) << 4) | (new)))
#define TT_ID_ERROR(family, sport, dport, err)                                      \
    ((1ULL << 63) | ((u64)(family) << 48) | ((u64)(u32)(err) << 32) |             \
     ((u32)(sport) << 16) | (dport))

#ifdef TT_RESCUE_ONLY
/* Tests only: the tracepoint programs step aside and the twins handle every hit, so the rescue
 * path meets real sockets (tests/kernel/test_foundation.py). */
#define TT_STEP_ASIDE() return 0
#else
#define TT_STEP_ASIDE()
#endif

#ifdef TT_RESCUE
/* marks: per kind, per CPU, per level, the hit the tracepoint program took last and the hit the
 * first twin took last: what the twins look for. Written by every hit of a tracepoint program
 * (tt_mark) and by a first twin that takes a hit; overwritten by the next hit at that level, and
 * consumed (zeroed) by the second twin. Per level (task or interrupt), because hits nest only
 * through interrupts: a softirq can run between a task-level hit's program and its twins, and
 * its own hits (all three programs each) complete before the task level resumes. Within a
 * level, a hit's programs run back to back with preemption off, so one slot each is exact, where
 * a ring of recent marks shared by the levels is not (docs/design.md, "Recursion rescue"). */
struct tt_marks {
    u64 took[2];    /* tracepoint program */
    u64 done[2];    /* first twin */
};
BPF_PERCPU_ARRAY(marks, struct tt_marks, TT_KIND_MAX);
/* rescued: per kind, per CPU, hits the twins handled because the tracepoint program was
 * skipped; incremented by the twins, never reset. User space subtracts them from the programs'
 * recursion misses. */
BPF_PERCPU_ARRAY(rescued, u64, TT_KIND_MAX);

/* A pointer's value as a number (the verifier keeps a pointer a pointer). */
static __always_inline u64 tt_addr(void *p)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), &p);
    return v;
}

/* Which level a hit runs at, from an address on the kernel stack it runs on: 0 on the current
 * task's stack (process context, or ksoftirqd, which nothing interrupts with hits), 1 on an
 * interrupt stack (a softirq, run from an interrupt or from local_bh_enable(): both switch to the
 * CPU's IRQ stack). Not the program's own frame: since 6.13 a BPF program may run on a private
 * per-CPU stack. TT_OFF_TASK_STACK is task_struct.stack, TT_SZ_STACK THREAD_SIZE (from BTF). */
static __always_inline u32 tt_level(u64 sp)
{
    u64 stack = 0;
    bpf_probe_read_kernel(&stack, sizeof(stack),
                          (void *)(bpf_get_current_task() + TT_OFF_TASK_STACK));
    return sp - stack < TT_SZ_STACK ? 0 : 1;
}

/* A tracepoint program's stack address: the kernel stores the caller's registers (perf's
 * per-context copy) in the first word of the record before running the program
 * (perf_trace_run_bpf_submit), and regs->sp is the tracepoint caller's frame. */
static __always_inline u64 tt_tp_sp(void *args)
{
    u64 regs = 0, sp = 0;
    bpf_probe_read_kernel(&regs, sizeof(regs), args);
    bpf_probe_read_kernel(&sp, sizeof(sp), (void *)(regs + TT_OFF_REGS_SP));
    return sp;
}

static __always_inline void tt_mark(void *args, u32 kind, u64 id)
{
    struct tt_marks *m = marks.lookup(&kind);
    if (m)
        m->took[tt_level(tt_tp_sp(args)) & 1] = id;
}
#define TT_MARK(kind, id) tt_mark(args, kind, id)

/* The raw twins, attached by name (tcptrace/kernel/loader.py) after the tracepoint programs, so
 * on each hit they run after them. Both twins of a hook, attached in this order: */
#define TT_TWINS(hook)                                                              \
    int tt_rescue_##hook(struct bpf_raw_tracepoint_args *ctx)                       \
    {                                                                               \
        return tt_twin_##hook(ctx, 0);                                              \
    }                                                                               \
    int tt_rescue2_##hook(struct bpf_raw_tracepoint_args *ctx)                      \
    {                                                                               \
        return tt_twin_##hook(ctx, 1);                                              \
    }

/* 1 if this hit is already taken care of, 0 if this twin must do the work. Two twins, because a
 * twin doing the work runs long enough to be interrupted itself, with the tracepoint program
 * still blocked (a preempted bpf(2) call keeps bpf_prog_active taken), and the kernel skips the
 * first twin for hits in that interrupt: the second twin, finding neither the program's mark
 * nor the first twin's, takes them. The second consumes the marks of its level. */
static __always_inline int tt_taken(struct bpf_raw_tracepoint_args *ctx, u32 kind, u64 id,
                                    int second)
{
    struct tt_marks *m = marks.lookup(&kind);
    if (!m)
        return 1;                   /* cannot tell: never risk a duplicate */
    u32 lvl = tt_level(tt_addr(ctx)) & 1;   /* ctx: the args array, on the kernel stack */
    if (m->took[lvl] == id) {
        if (second)
            m->took[lvl] = 0;
        return 1;
    }
    if (second) {
        if (m->done[lvl] == id) {
            m->done[lvl] = 0;
            return 1;
        }
    } else {
        m->done[lvl] = id;
    }
    u64 *n = rescued.lookup(&kind);
    if (n)
        (*n)++;
    return 0;
}

/* What the tracepoints' TP_fast_assign reads: family and ports from sock_common and inet_sock,
 * inet_saddr / skc_daddr for IPv4, the skc_v6 pair for IPv6. */
static __always_inline void tt_read_sk(u64 sk, struct tt_sk *s)
{
    u16 port = 0;
    bpf_probe_read_kernel(&s->family, 2, (void *)(sk + TT_OFF_FAMILY));
    bpf_probe_read_kernel(&port, 2, (void *)(sk + TT_OFF_SPORT));
    s->sport = ntohs(port);
    port = 0;
    bpf_probe_read_kernel(&port, 2, (void *)(sk + TT_OFF_DPORT));
    s->dport = ntohs(port);
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

static __always_inline int tt_twin_state(struct bpf_raw_tracepoint_args *ctx, int second)
{
    u64 sk = ctx->args[0];
    u8 old = ctx->args[1], new = ctx->args[2];
    if (tt_taken(ctx, TT_STATE, TT_ID_STATE(sk, old, new), second) ||
        tt_read_protocol(sk) != TT_IPPROTO_TCP)
        return 0;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_state(ctx, sk, old, new, &s);
    return 0;
}
TT_TWINS(state)

#ifdef TT_HOOK_RECV_RESET
static __always_inline int tt_twin_recv_reset(struct bpf_raw_tracepoint_args *ctx, int second)
{
    u64 sk = ctx->args[0];
    if (tt_taken(ctx, TT_RECV_RESET, sk, second))
        return 0;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_recv_reset(ctx, sk, &s);
    return 0;
}
TT_TWINS(recv_reset)
#endif

#ifdef TT_HOOK_SOCK_ERROR
static __always_inline int tt_twin_sock_error(struct bpf_raw_tracepoint_args *ctx, int second)
{
    u64 sk = ctx->args[0];
    int err = 0;
    struct tt_sk s = {};
    /* The id needs the fields, so they are read on every hit: error reports are rare. */
    tt_read_sk(sk, &s);
    bpf_probe_read_kernel(&err, 4, (void *)(sk + TT_OFF_ERR));
    if (tt_taken(ctx, TT_SOCK_ERROR, TT_ID_ERROR(s.family, s.sport, s.dport, err), second) ||
        tt_read_protocol(sk) != TT_IPPROTO_TCP)
        return 0;
    tt_sock_error(ctx, err, &s);
    return 0;
}
TT_TWINS(sock_error)
#endif

#ifdef TT_HOOK_RETRANS
static __always_inline int tt_twin_retrans(struct bpf_raw_tracepoint_args *ctx, int second)
{
    u64 sk = ctx->args[0];
    u8 state = 0;
    if (tt_taken(ctx, TT_RETRANS, sk, second))
        return 0;
    bpf_probe_read_kernel(&state, 1, (void *)(sk + TT_OFF_STATE));
    if (state != TT_SYN_SENT)
        return 0;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_retrans(ctx, sk, &s);
    return 0;
}
TT_TWINS(retrans)
#endif

#else
#define TT_MARK(kind, id)
#endif
