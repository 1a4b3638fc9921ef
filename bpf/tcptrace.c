/* tcptrace kernel side: TCP state transitions and the facts that explain failed connects.
 *
 * Reads only tracepoint fields (BCC lays them out from tracefs, so they are right on any kernel)
 * and opaque pointers used as keys. Nothing here dereferences a kernel struct: the headers BCC
 * compiles against may belong to another kernel version than the one running.
 *
 * Compile-time switches (-D, chosen in tcptrace/kernel.py):
 *   TT_RINGBUF=1            BPF ring buffer transport (else a perf event array)
 *   TT_RINGBUF_PAGES=n      ring size in pages (power of two)
 *   TT_KPROBES=1            also build the tcp_v{4,6}_connect kprobe pair (kernel has kprobes)
 *   TT_SYSCALL_CONNECT=1    fallback: syscalls:sys_{enter,exit}_connect for pre-SYN failures
 *   TT_HOLD=1               hold ESTABLISHED sockets' steps (`held`; needs queue maps, 4.20)
 *   TT_HOOK_*=1             each optional tracepoint the running kernel has (tcptrace/probes.py):
 *                           BCC fails to compile a probe whose tracepoint is missing
 *   TT_RESCUE=1             the recursion rescue (below), with TT_OFF_* (struct sock and
 *                           task_struct member offsets) and TT_SZ_STACK (THREAD_SIZE) of the
 *                           running kernel, from its BTF (tcptrace/btf.py)
 *   TT_RESCUE_ONLY=1        tests only: the tracepoint programs step aside and the rescue
 *                           programs handle every hit, so the rescue path is exercised for real
 *
 * Recursion rescue. A tracepoint program runs through trace_call_bpf(), which skips it (and
 * counts a recursion miss) whenever the CPU's bpf_prog_active is taken: by any kprobe or
 * tracepoint BPF program running there (ours or another tool's), and by every bpf(2) map
 * operation user space makes (bpf_disable_instrumentation(); reading the `socks` map walks all
 * its buckets that way). A softirq that interrupts one of those makes transitions that were
 * lost. Raw tracepoint programs are not subject to that check. So each tracepoint program first
 * writes a mark naming the hit (per CPU and level, see `marks`), and a raw tracepoint twin on the
 * same hook, running after it, finds the mark, or, finding none, knows the program was skipped and
 * does its work.
 * The twin has no tracepoint record, so it reads the socket's fields itself, at offsets from the
 * running kernel's BTF (never from the compile-time headers, which may be another version's).
 */
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include "tcptrace.h"

#define TT_IPPROTO_TCP 6
#define TT_ESTABLISHED 1
#define TT_SYN_SENT 2
#define TT_SYN_RECV 3
#define TT_FIN_WAIT1 4
#define TT_CLOSE 7
#define TT_CLOSE_WAIT 8
#define TT_LAST_ACK 9
#define TT_LISTEN 10
#define TT_EINPROGRESS 115
#define TT_AF_INET 2

#ifndef TT_SOCKS_MAX
#define TT_SOCKS_MAX 65536
#endif

/* config: one entry, written by user space after load (armed last), read on every hit. Never
 * deleted. */
BPF_ARRAY(config, struct tt_config, 1);
/* ports: port filter set (host byte order), filled by user space after load, never changed. */
BPF_HASH(ports, u16, u8, 64);
/* drops: records the transport refused (buffer full), per kind, per CPU. Counted here because
 * the perf "lost" record arrives only when a later record fits, and the ring buffer has none. */
BPF_PERCPU_ARRAY(drops, u64, TT_KIND_MAX);
/* state_hits: runs of the inet_sock_set_state program, per CPU, with or without the rescue:
 * incremented first thing on every run, never reset; user space sets it against a count of the
 * tracepoint's hits that needs no BPF (tcptrace/kernel/tally.py). */
BPF_PERCPU_ARRAY(state_hits, u64, 1);
/* socks: per socket, the transitions not sent yet: a TT_STATE record being filled. Created at a
 * socket's first unsent transition, deleted when the record is sent (ESTABLISHED, LISTEN, CLOSE,
 * or full), so it holds only sockets between those states: in a handshake, in a close, or resting
 * half-closed. User space reads it on a timer (tcptrace/kernel.py:KernelSource.scan) and never
 * writes it. A plain hash, not LRU: an eviction would lose steps silently, while a full map only
 * makes a transition go out on its own. Not preallocated: it is usually small. Sized for 65,536
 * sockets in between at once, not more: reading it walks every bucket, full or empty (190 us
 * per read at 262,144 entries, 10 reads a second). An entry whose CLOSE was never seen (a
 * recursion miss) stays until its address is reused by a new socket. */
BPF_F_TABLE("hash", u64, struct tt_event, socks, TT_SOCKS_MAX, BPF_F_NO_PREALLOC);

#ifdef TT_HOLD
/* held: per socket, the steps up to ESTABLISHED, held back for config.hold_us in the hope that
 * the socket's next transitions come soon: most connections are short, and their opening and
 * closing steps then go out as one record instead of two, which halves what user space decodes
 * and sorts. Moved here from `socks` at ESTABLISHED, and back into `socks` (carried, ahead of the
 * new step) by the socket's next transition, which deletes the entry: only the socket's own
 * transitions, serialised by its lock, ever write or delete it. A socket still here after
 * hold_us is sent early by tt_flush (a copy, flagged TT_F_HELD; the entry stays until the next
 * transition, which carries the steps again: user space takes them once). So the map holds every
 * ESTABLISHED socket, up to its size; past that a socket's steps are sent at ESTABLISHED, as
 * without holding. Not preallocated, like `socks`; user space never walks it. */
#ifndef TT_HELD_MAX
#define TT_HELD_MAX 65536
#endif
BPF_F_TABLE("hash", u64, struct tt_event, held, TT_HELD_MAX, BPF_F_NO_PREALLOC);
/* held_q: the held sockets in the order they were held, as (socket, the ESTABLISHED step's
 * time): what tt_flush finds due without walking `held`. Every hit of inet_sock_set_state takes
 * what is due at the head; when no hit comes, user space does (kernel.KernelSource.scan). An
 * entry whose socket has moved on, or whose address a newer socket holds, is dropped. */
struct tt_hold {
    u64 sk;
    u64 ts;
};
BPF_QUEUE(held_q, struct tt_hold, TT_HELD_MAX);
/* flushbuf: where tt_flush builds its copy (the stack has no room for a second record). Per CPU;
 * only the tracepoint program uses it, and a hit interrupting that program on its CPU is skipped
 * by the kernel (bpf_prog_active), so it is never used twice at once. */
BPF_PERCPU_ARRAY(flushbuf, struct tt_event, 1);
#define TT_FLUSH_PER_HIT 2   /* a connection holds two sockets and makes about ten hits */
#endif

#ifdef TT_RESCUE
/* marks: per kind, per CPU, per level, the hit the tracepoint program took last and the hit the
 * first twin took last: what the twins look for. Per level (task or interrupt), because hits
 * nest only through interrupts: a softirq can run between a task-level hit's program and its
 * twins, and its own hits (all three programs each) complete before the task level resumes.
 * Within a level, a hit's programs run back to back with preemption off, so one slot each is
 * exact. (A shared ring of recent marks was tried: a softirq making many hits pushed a waiting
 * mark out, which made a duplicate, and a mark no twin consumed matched a later hit of the same
 * socket address, which lost it.) */
struct tt_marks {
    u64 took[2];    /* tracepoint program */
    u64 done[2];    /* first twin */
};
BPF_PERCPU_ARRAY(marks, struct tt_marks, TT_KIND_MAX);
/* rescued: per kind, per CPU, hits the twins handled because the tracepoint program was
 * skipped. User space subtracts them from the programs' recursion misses. */
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
    bpf_probe_read_kernel(&stack, sizeof(stack), (void *)(bpf_get_current_task() + TT_OFF_TASK_STACK));
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
#else
#define TT_MARK(kind, id)
#endif

#ifdef TT_RINGBUF
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
/* spill: where a record goes when the ring refuses it. The ring refuses records now and then
 * although it is nearly empty (measured on a 6.18 guest: 3-20 per 470k records, with at most
 * 0.3 MB of the 8 MB in use at any read, the same with 32 MB); the cause was not found, and the
 * per-CPU perf buffers do not share it. User space reads both on every drain. */
BPF_PERF_OUTPUT(spill);
/* spilled: per kind, per CPU, records that went through `spill`. */
BPF_PERCPU_ARRAY(spilled, u64, TT_KIND_MAX);
#else
BPF_PERF_OUTPUT(events);
#endif

static __always_inline int tt_wanted(u16 family, u16 sport, u16 dport)
{
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    if (!c || !c->armed)
        return 0;
    if (c->family && c->family != family)
        return 0;
    if (c->port_filter && !ports.lookup(&sport) && !ports.lookup(&dport))
        return 0;
    return 1;
}

static __always_inline int tt_send(void *ctx, struct tt_event *ev)
{
    int rc;
#ifdef TT_RINGBUF
    /* No wake-up per record: waking the reader costs 8-10 us per event on small machines.
     * User space drains the ring on a short timer instead (tcptrace/kernel.py). */
    rc = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
    if (rc < 0) {
        rc = spill.perf_submit(ctx, ev, sizeof(*ev));
        if (rc == 0) {
            u32 k = ev->kind;
            u64 *n = spilled.lookup(&k);
            if (n)
                (*n)++;
        }
    }
#else
    rc = events.perf_submit(ctx, ev, sizeof(*ev));
#endif
    return rc;
}

static __always_inline void tt_emit(void *ctx, struct tt_event *ev)
{
    if (tt_send(ctx, ev) < 0) {
        u32 k = ev->kind;
        u64 *n = drops.lookup(&k);
        if (n)
            *n += ev->nsteps ? ev->nsteps : 1;   /* transitions lost, not records */
    }
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

/* The socket fields the tracepoints report, in the record's layout: from the tracepoint record,
 * or, in a rescue, read from the socket. */
struct tt_sk {
    u16 family;
    u16 sport;        /* host byte order */
    u16 dport;
    u16 _pad;
    u8  saddr[16];    /* IPv4 in the first 4 bytes */
    u8  daddr[16];
};

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

#ifdef TT_RESCUE_ONLY
#define TT_STEP_ASIDE() return 0
#else
#define TT_STEP_ASIDE()
#endif

/* What identifies a hit to both a tracepoint program and its twin. Sockets lie more than 256
 * bytes apart, so the states can share the pointer's word; bit 63 keeps an id from being 0 (an
 * empty mark). sock_error has no socket pointer in its record: ports and errno stand in. */
#define TT_ID_STATE(sk, old, new) ((u64)(sk) ^ (((u64)(old) << 4) | (new)))
#define TT_ID_ERROR(family, sport, dport, err)                                      \
    ((1ULL << 63) | ((u64)(family) << 48) | ((u64)(u32)(err) << 32) | ((u32)(sport) << 16) | (dport))

#ifdef TT_SYSCALL_CONNECT
/* connecting: per thread, from sys_enter_connect to sys_exit_connect. Inserted on enter for
 * inet sockaddrs, deleted on exit; skaddr is set by the CLOSE->SYN_SENT transition in between,
 * which marks "the kernel got as far as sending a SYN". LRU so a thread killed mid-syscall
 * cannot leak an entry forever. */
struct tt_connecting {
    u64 skaddr;
    u32 fd;
    u16 family;
    u16 dport;
    u8 daddr[16];
};
BPF_TABLE("lru_hash", u32, struct tt_connecting, connecting, 4096);
#endif

static __always_inline void tt_put_step(struct tt_event *e, u32 n, u64 ts, u32 pid, u8 old, u8 new)
{
    if (n >= TT_MAX_STEPS)
        return;
    e->step_ts[n] = ts;
    e->step_pid[n] = pid;
    e->step_old[n] = old;
    e->step_new[n] = new;
    /* Steps before the count: user space may read the entry while it is being written. */
    asm volatile("" ::: "memory");
    e->nsteps = n + 1;
}

/* Is the current task another than the one record e names (pid, tid and comm)? */
static __always_inline int tt_other_task(struct tt_event *e, u64 id)
{
    if (e->pid != (u32)(id >> 32) || e->tid != (u32)id)
        return 1;
    u64 comm[2] = {};
    bpf_get_current_comm(comm, sizeof(comm));
    u64 *had = (u64 *)e->comm;
    return comm[0] != had[0] || comm[1] != had[1];
}

#ifdef TT_HOLD
static __always_inline u32 tt_hold_us(void)
{
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    return c ? c->hold_us : 0;
}

/* Hold an ESTABLISHED socket's steps (see `held`): 1 if held, 0 if they must go out now. */
static __always_inline int tt_hold(u64 sk, u64 ts, struct tt_event *e)
{
    if (!tt_hold_us())
        return 0;
    if (held.insert(&sk, e) != 0)       /* full, or a stale entry (checked at fresh steps) */
        return 0;
    struct tt_hold q = {.sk = sk, .ts = ts};
    if (held_q.push(&q, 0) != 0) {      /* nothing would send it early: not held */
        held.delete(&sk);
        return 0;
    }
    return 1;
}

/* A held socket's next transition: its steps go back into `socks`, ahead of this one (the
 * entry returned), or out now, on their own, when a new socket took the address (the old one's
 * CLOSE was missed) or another task makes the owner's step. */
static __always_inline struct tt_event *tt_unhold(void *ctx, u64 sk, u64 id, u64 ts, int owner,
                                                  int fresh)
{
    struct tt_event *h = held.lookup(&sk);
    if (!h)
        return 0;
    struct tt_event *e = 0;
    if (!fresh && !(owner && (h->flags & TT_F_OWNER) && tt_other_task(h, id))) {
        if (socks.insert(&sk, h) == 0)
            e = socks.lookup(&sk);
    }
    if (!e) {
        /* Possibly sent early already: flagged so user space takes the steps once. */
        h->flags |= TT_F_HELD;
        h->ts_ns = ts;
        tt_emit(ctx, h);
    }
    held.delete(&sk);
    return e;
}

/* Send what is due at the head of held_q: sockets held hold_us ago and still ESTABLISHED. A copy
 * goes out; the entry stays for the socket's own next transition (see `held`). A record the
 * transport refuses is not counted lost: its steps come again with that transition. */
static __always_inline void tt_flush(void *ctx)
{
    u32 hold_us = tt_hold_us();
    if (!hold_us)
        return;
    int zero = 0;
    struct tt_event *f = flushbuf.lookup(&zero);
    if (!f)
        return;
    u64 now = bpf_ktime_get_ns();
#pragma unroll
    for (int i = 0; i < TT_FLUSH_PER_HIT; i++) {
        struct tt_hold q = {};
        if (held_q.peek(&q) != 0 || now - q.ts < (u64)hold_us * 1000)
            return;
        if (held_q.pop(&q) != 0)
            return;
        struct tt_event *h = held.lookup(&q.sk);
        if (!h || h->ts_ns != q.ts)
            continue;
        __builtin_memcpy(f, h, sizeof(*f));
        f->flags |= TT_F_HELD;
        f->ts_ns = now;
        tt_send(ctx, f);
    }
}
#endif

/* sock:inet_sock_set_state, TCP only (the caller checked the protocol). */
static __always_inline void tt_state(void *ctx, u64 sk, u8 old, u8 new, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    u64 id = bpf_get_current_pid_tgid();
    u64 ts = bpf_ktime_get_ns();
    /* Steps a process makes itself name the socket's owner; the others run in softirq. */
    int owner = (old == TT_CLOSE && (new == TT_SYN_SENT || new == TT_LISTEN)) ||
                (old == TT_ESTABLISHED && new == TT_FIN_WAIT1) ||
                (old == TT_CLOSE_WAIT && new == TT_LAST_ACK);
    int fresh = (old == TT_CLOSE && (new == TT_SYN_SENT || new == TT_LISTEN)) ||
                (old == TT_LISTEN && new == TT_SYN_RECV);
    /* Where a socket may rest for long, or is gone: send what is pending now. */
    int send = new == TT_ESTABLISHED || new == TT_CLOSE || new == TT_LISTEN;
#ifdef TT_SYSCALL_CONNECT
    if (new == TT_SYN_SENT) {
        u32 tid = (u32)id;
        struct tt_connecting *c = connecting.lookup(&tid);
        if (c)
            c->skaddr = sk;
    }
#endif
    struct tt_event *e = socks.lookup(&sk);
    /* Send what is pending and start a new record: at a new socket at the address of one whose
     * CLOSE we never saw (a recursion miss; user space sees the gap), and at another task's own
     * step, since a record names one task (only a record carrying a held connect() can meet
     * one; tt_unhold checks the held steps alike). */
    if (e && (fresh || (owner && (e->flags & TT_F_OWNER) && tt_other_task(e, id)))) {
        tt_emit(ctx, e);
        socks.delete(&sk);
        e = 0;
    }
#ifdef TT_HOLD
    if (!e)
        e = tt_unhold(ctx, sk, id, ts, owner, fresh);
#endif
    if (!e) {
        struct tt_event ev = {};
        ev.kind = TT_STATE;
        ev.skaddr = sk;
        tt_set_task(&ev, id);
        if (owner)
            ev.flags = TT_F_OWNER;
        ev.ts_ns = ts;
        ev.oldstate = old;
        ev.newstate = new;
        tt_put_sk(&ev, s);
        if (!send) {
            ev.nsteps = 0;
            if (socks.insert(&sk, &ev) == 0)
                e = socks.lookup(&sk);
        }
        if (!e) {
            /* Nothing pending and nothing to wait for (or the map is full): one step, now. */
            tt_put_step(&ev, 0, ts, id >> 32, old, new);
            tt_emit(ctx, &ev);
            return;
        }
    } else {
        e->ts_ns = ts;
        e->oldstate = old;
        e->newstate = new;
        if (s->sport)               /* CLOSE->SYN_SENT has no local port yet */
            tt_put_sk(e, s);
        if (owner) {
            tt_set_task(e, id);
            e->flags |= TT_F_OWNER;
        }
    }
    u32 n = e->nsteps;
    tt_put_step(e, n, ts, id >> 32, old, new);
    if (send || n + 1 >= TT_MAX_STEPS) {
#ifdef TT_HOLD
        if (new == TT_ESTABLISHED && n + 1 < TT_MAX_STEPS && tt_hold(sk, ts, e)) {
            socks.delete(&sk);
            return;
        }
#endif
        tt_emit(ctx, e);
        socks.delete(&sk);
    }
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    /* Every run, first thing: with the kernel's recursion misses of this program, what BPF was
     * shown of the hook, set against a count the tracing ring keeps (kernel.Tally). */
    int zero = 0;
    u64 *hits = state_hits.lookup(&zero);
    if (hits)
        (*hits)++;
    TT_STEP_ASIDE();
    TT_MARK(TT_STATE, TT_ID_STATE(args->skaddr, args->oldstate, args->newstate));
    if (args->protocol == TT_IPPROTO_TCP) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_state(args, (u64)args->skaddr, args->oldstate, args->newstate, &s);
#ifdef TT_HOLD
        tt_flush(args);
#endif
    }
    return 0;
}

#ifdef TT_HOOK_RECV_RESET
static __always_inline void tt_recv_reset(void *ctx, u64 sk, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_event *e = socks.lookup(&sk);
#ifdef TT_HOLD
    if (!e)
        e = held.lookup(&sk);       /* the transition the reset makes carries it out */
#endif
    if (e) {                        /* told with the socket's pending steps */
        if (!e->rst_ns)
            e->rst_ns = bpf_ktime_get_ns();
        return;
    }
    struct tt_event ev = {};
    ev.kind = TT_RECV_RESET;
    tt_task(&ev);
    ev.skaddr = sk;
    tt_put_sk(&ev, s);
    tt_emit(ctx, &ev);
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    TT_STEP_ASIDE();
    TT_MARK(TT_RECV_RESET, (u64)args->skaddr);
    struct tt_sk s = {};
    TT_SK_FROM_ARGS(&s, args);
    tt_recv_reset(args, (u64)args->skaddr, &s);
    return 0;
}
#endif

#ifdef TT_HOOK_SEND_RESET
/* A raw tracepoint, because the regular one's record differs between kernels in ways BCC cannot
 * compile against foreign headers (6.10+ adds `enum sk_rst_reason`, unknown to 6.1 headers).
 * The first argument, the sock, is the same in every version. A NULL sock is a reset sent for no
 * socket (e.g. the answer to a SYN on a closed port): the other end's TT_RECV_RESET tells that. */
RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    u64 sk = ctx->args[0];
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    if (!sk || !c || !c->armed)
        return 0;
    struct tt_event ev = {};
    ev.kind = TT_SEND_RESET;
    tt_task(&ev);
    ev.skaddr = sk;
    tt_emit(ctx, &ev);
    return 0;
}
#endif

#ifdef TT_HOOK_SOCK_ERROR
/* TCP only (the caller checked). The tracepoint carries no sock pointer. */
static __always_inline void tt_sock_error(void *ctx, int err, struct tt_sk *s)
{
    if (!tt_wanted(s->family, s->sport, s->dport))
        return;
    struct tt_event ev = {};
    ev.kind = TT_SOCK_ERROR;
    tt_task(&ev);
    ev.err = err;
    tt_put_sk(&ev, s);
    tt_emit(ctx, &ev);
}

TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
    TT_STEP_ASIDE();
    TT_MARK(TT_SOCK_ERROR, TT_ID_ERROR(args->family, args->sport, args->dport, args->error));
    if (args->protocol == TT_IPPROTO_TCP) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_sock_error(args, args->error, &s);
    }
    return 0;
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
    ev.kind = TT_RETRANS;
    tt_task(&ev);
    ev.skaddr = sk;
    ev.oldstate = TT_SYN_SENT;
    tt_put_sk(&ev, s);
    tt_emit(ctx, &ev);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    TT_STEP_ASIDE();
    TT_MARK(TT_RETRANS, (u64)args->skaddr);
    if (args->state == TT_SYN_SENT) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_retrans(args, (u64)args->skaddr, &s);
    }
    return 0;
}
#endif

#ifdef TT_RESCUE
/* The raw twins (attached by name from tcptrace/kernel.py, after the tracepoint programs, so on
 * each hit they run second). */

/* Both twins of a hook, attached in this order. */
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
static __always_inline int tt_taken(struct bpf_raw_tracepoint_args *ctx, u32 kind, u64 id, int second)
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
    if (tt_taken(ctx, TT_STATE, TT_ID_STATE(sk, old, new), second) || tt_read_protocol(sk) != TT_IPPROTO_TCP)
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
#endif

#ifdef TT_KPROBES
/* connect_sk: per thread, tcp_v{4,6}_connect entry to return. Inserted at entry, deleted at
 * return; LRU so a lost return cannot leak. Value: the sock pointer (a key, never read) and the
 * destination, copied from the kernel's own copy of the user's sockaddr (uapi layout). */
struct tt_csk {
    u64 skaddr;
    u16 family;
    u16 dport;
    u8 daddr[16];
};
BPF_TABLE("lru_hash", u32, struct tt_csk, connect_sk, 4096);

static __always_inline int tt_connect_entry(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tt_csk c = {};
    c.skaddr = (u64)sk;
    bpf_probe_read_kernel(&c.family, sizeof(c.family), &uaddr->sa_family);
    if (c.family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)uaddr;
        bpf_probe_read_kernel(&c.dport, 2, &in->sin_port);
        bpf_probe_read_kernel(c.daddr, 4, &in->sin_addr);
    } else if (c.family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)uaddr;
        bpf_probe_read_kernel(&c.dport, 2, &in6->sin6_port);
        bpf_probe_read_kernel(c.daddr, 16, &in6->sin6_addr);
    }
    c.dport = ntohs(c.dport);
    connect_sk.update(&tid, &c);
    return 0;
}

int kprobe__tcp_v4_connect(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr)
{
    return tt_connect_entry(ctx, sk, uaddr);
}

int kprobe__tcp_v6_connect(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr)
{
    return tt_connect_entry(ctx, sk, uaddr);
}

static __always_inline int tt_connect_return(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tt_csk *c = connect_sk.lookup(&tid);
    if (!c)
        return 0;
    int ret = PT_REGS_RC(ctx);
    /* Success (0) is told by the CLOSE->SYN_SENT transition. A failure here happened before any
     * state change (no route, no local port, a cgroup/BPF or LSM denial): nothing else sees it. */
    if (ret != 0 && tt_wanted(c->family, 0, c->dport)) {
        struct tt_event ev = {};
        ev.kind = TT_CONNECT_RET;
        tt_task(&ev);
        ev.skaddr = c->skaddr;
        ev.err = ret;
        ev.flags = TT_F_KPROBE;
        ev.family = c->family;
        ev.dport = c->dport;
        __builtin_memcpy(ev.daddr, c->daddr, 16);
        tt_emit(ctx, &ev);
    }
    connect_sk.delete(&tid);
    return 0;
}

int kretprobe__tcp_v4_connect(struct pt_regs *ctx)
{
    return tt_connect_return(ctx);
}

int kretprobe__tcp_v6_connect(struct pt_regs *ctx)
{
    return tt_connect_return(ctx);
}
#endif

#ifdef TT_SYSCALL_CONNECT
TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    struct tt_connecting c = {};
    struct sockaddr *sa = (struct sockaddr *)args->uservaddr;
    /* The user's sockaddr: uapi layout, read from user memory, so no kernel-version risk. */
    bpf_probe_read_user(&c.family, sizeof(c.family), &sa->sa_family);
    if (c.family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        bpf_probe_read_user(&c.dport, 2, &in->sin_port);
        bpf_probe_read_user(c.daddr, 4, &in->sin_addr);
    } else if (c.family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
        bpf_probe_read_user(&c.dport, 2, &in6->sin6_port);
        bpf_probe_read_user(c.daddr, 16, &in6->sin6_addr);
    } else {
        return 0;
    }
    c.dport = ntohs(c.dport);
    c.fd = args->fd;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    connecting.update(&tid, &c);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tt_connecting *c = connecting.lookup(&tid);
    if (!c)
        return 0;
    long ret = args->ret;
    /* Only failures that happened before a SYN went out (no SYN_SENT seen in this call): the
     * others are told by the transitions, resets and error reports. The socket's protocol is not
     * visible here; user space checks the fd (tcptrace/owners.py). */
    if (ret < 0 && ret != -TT_EINPROGRESS && c->skaddr == 0 && tt_wanted(c->family, 0, c->dport)) {
        struct tt_event ev = {};
        ev.kind = TT_CONNECT_RET;
        tt_task(&ev);
        ev.err = ret;
        ev.aux = c->fd;
        ev.flags |= TT_F_SYSCALL;
        ev.family = c->family;
        ev.dport = c->dport;
        __builtin_memcpy(ev.daddr, c->daddr, 16);
        tt_emit(args, &ev);
    }
    connecting.delete(&tid);
    return 0;
}
#endif
