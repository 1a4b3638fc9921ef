/* The state hook as a raw tracepoint (TT_STATE_RAW, the plan's choice wherever BTF gives the
 * socket's offsets; else the tracepoint program in tcptrace.c). Two reasons:
 *   - a raw tracepoint program has no record assembled for it: it reads only the fields it
 *     needs from the socket (record.c: tt_read_sk);
 *   - the kernel skips it only when it re-enters itself on a CPU, that is when a softirq that
 *     interrupts it makes a transition there. A tracepoint program is skipped whenever the
 *     CPU's bpf_prog_active is taken, by any kprobe or tracepoint BPF program and by every
 *     bpf(2) map operation (ours: user space reads `socks` ten times a second), which took
 *     three programs per hit to recover (rescue.c).
 * The hits it is skipped for are taken by one raw twin attached after it (loader.py), which
 * must know whether the program ran for its hit: see `taken`.
 * Part of tcptrace.c, after the parts tt_state and tt_flush come from. */

/* taken: per CPU, the ids (TT_ID_STATE) of the hits the program took and whose twin has not run
 * yet, as a stack: the program pushes its hit's id first thing, and its twin, which runs after
 * it on the same hit, pops down to that id. A twin that finds its id in none of the top
 * TT_TAKEN slots knows that the program was skipped for its hit, and does the work. Why a
 * stack: hits nest only through interrupts, and an interrupt's hits (program and twin each)
 * are done before the interrupted one resumes. So
 *   - a hit nesting anywhere in the program's run (even before its push or after its end: the
 *     kernel marks the program busy around it) pushes nothing and finds nothing;
 *   - one nesting between the program and its twin is pushed and popped above the outer id;
 *   - one nesting in a twin, whose own twin the kernel then skips, is pushed above; the outer
 *     twin drops it with its pop, or, if it did the work instead, by putting the stack back
 *     as it found it.
 * So the stack holds only hits whose twin is still to come, a slot per level of nesting, and a
 * stale id can never match a later hit. No per-level marks, so no reads of the stack pointer
 * or of the task: two map lookups a hit. Only a softirq with more than TT_TAKEN transitions
 * landing in the few instructions before a twin reads the stack could push its hit's id out of
 * reach, making the twin take a hit the program took (counted in `rescued`). */
#define TT_TAKEN 16
/* A hit's id: sockets lie more than 256 bytes apart, so the states can share the pointer's
 * word. */
#define TT_ID_STATE(sk, old, new) ((u64)(sk) ^ (((u64)(old) << 4) | (new)))
struct tt_taken {
    u64 id[TT_TAKEN];
    u32 top;            /* pushes less pops; the slot is top % TT_TAKEN */
    u32 flushing;       /* the program is in tt_flush on this CPU */
};
BPF_PERCPU_ARRAY(taken, struct tt_taken, 1);

static __always_inline void tt_state_raw(void *ctx, u64 sk, u8 old, u8 new)
{
    if (tt_read_protocol(sk) != TT_IPPROTO_TCP)
        return;
    struct tt_sk s = {};
    tt_read_sk(sk, &s);
    tt_state(ctx, sk, old, new, &s);
}

int tt_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    u8 old = ctx->args[1], new = ctx->args[2];
    tt_hit(TT_STATE);
    TT_STEP_ASIDE();
    u32 zero = 0;
    struct tt_taken *t = taken.lookup(&zero);
    if (!t)
        return 0;
    u32 top = t->top;
    t->id[top % TT_TAKEN] = TT_ID_STATE(sk, old, new);
    /* The slot before the count: a twin nesting in between must find nothing. */
    asm volatile("" ::: "memory");
    t->top = top + 1;
    tt_state_raw(ctx, sk, old, new);
    /* flushbuf (hold.c) is one per CPU: a kernel that let this program nest in itself (those
     * before the raw tracepoint's recursion check) must not have two flushes share it. The
     * flush is only opportunistic: user space sends what it leaves (source.py: _due_held). */
    if (!t->flushing) {
        t->flushing = 1;
        tt_flush(ctx);
        t->flushing = 0;
    }
    return 0;
}

/* The twin (named like rescue.c's: the loss accounting ignores the twins' own misses, see
 * tcptrace/kernel/losses.py). No flush: it may run inside the program's own. */
int tt_rescue_state_raw(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    u8 old = ctx->args[1], new = ctx->args[2];
    u64 id = TT_ID_STATE(sk, old, new);
    u32 zero = 0;
    struct tt_taken *t = taken.lookup(&zero);
    if (!t)
        return 0;                   /* cannot tell: never risk a duplicate */
    u32 top = t->top;
#pragma unroll
    for (u32 i = 1; i <= TT_TAKEN; i++) {
        if (i <= top && t->id[(top - i) % TT_TAKEN] == id) {
            t->top = top - i;
            return 0;
        }
    }
    u32 kind = TT_STATE;
    u64 *n = rescued.lookup(&kind);
    if (n)
        (*n)++;
    tt_state_raw(ctx, sk, old, new);
    /* What was pushed meanwhile came from hits nesting in this twin: their programs ran, their
     * twins were skipped (this one was running). */
    t->top = top;
    return 0;
}
