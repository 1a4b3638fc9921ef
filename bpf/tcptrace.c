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
 *   TT_HOOK_*=1             each optional tracepoint the running kernel has (tcptrace/probes.py):
 *                           BCC fails to compile a probe whose tracepoint is missing
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

#ifdef TT_RINGBUF
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
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

static __always_inline void tt_emit(void *ctx, struct tt_event *ev)
{
    int rc;
#ifdef TT_RINGBUF
    /* No wake-up per record: waking the reader costs 8-10 us per event on small machines.
     * User space drains the ring on a short timer instead (tcptrace/kernel.py). */
    rc = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
#else
    rc = events.perf_submit(ctx, ev, sizeof(*ev));
#endif
    if (rc < 0) {
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

#define TT_COPY_ADDRS(ev, args)                                                     \
    do {                                                                            \
        if ((args)->family == AF_INET) {                                            \
            __builtin_memcpy((ev)->saddr, (args)->saddr, 4);                        \
            __builtin_memcpy((ev)->daddr, (args)->daddr, 4);                        \
        } else {                                                                    \
            __builtin_memcpy((ev)->saddr, (args)->saddr_v6, 16);                    \
            __builtin_memcpy((ev)->daddr, (args)->daddr_v6, 16);                    \
        }                                                                           \
    } while (0)

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

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != TT_IPPROTO_TCP)
        return 0;
    if (!tt_wanted(args->family, args->sport, args->dport))
        return 0;
    u64 sk = (u64)args->skaddr;
    u8 old = args->oldstate, new = args->newstate;
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
    if (e && fresh) {
        /* A new socket at the address of one whose CLOSE we never saw (a recursion miss): send
         * the old one's steps; user space sees the gap. */
        tt_emit(args, e);
        socks.delete(&sk);
        e = 0;
    }
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
        ev.family = args->family;
        ev.sport = args->sport;
        ev.dport = args->dport;
        TT_COPY_ADDRS(&ev, args);
        if (!send) {
            ev.nsteps = 0;
            if (socks.insert(&sk, &ev) == 0)
                e = socks.lookup(&sk);
        }
        if (!e) {
            /* Nothing pending and nothing to wait for (or the map is full): one step, now. */
            tt_put_step(&ev, 0, ts, id >> 32, old, new);
            tt_emit(args, &ev);
            return 0;
        }
    } else {
        e->ts_ns = ts;
        e->oldstate = old;
        e->newstate = new;
        if (args->sport) {          /* CLOSE->SYN_SENT has no local port yet */
            e->sport = args->sport;
            e->dport = args->dport;
            TT_COPY_ADDRS(e, args);
        }
        if (owner) {
            tt_set_task(e, id);
            e->flags |= TT_F_OWNER;
        }
    }
    u32 n = e->nsteps;
    tt_put_step(e, n, ts, id >> 32, old, new);
    if (send || n + 1 >= TT_MAX_STEPS) {
        tt_emit(args, e);
        socks.delete(&sk);
    }
    return 0;
}

#ifdef TT_HOOK_RECV_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    if (!tt_wanted(args->family, args->sport, args->dport))
        return 0;
    u64 sk = (u64)args->skaddr;
    struct tt_event *e = socks.lookup(&sk);
    if (e) {                        /* told with the socket's pending steps */
        if (!e->rst_ns)
            e->rst_ns = bpf_ktime_get_ns();
        return 0;
    }
    struct tt_event ev = {};
    ev.kind = TT_RECV_RESET;
    tt_task(&ev);
    ev.skaddr = (u64)args->skaddr;
    ev.family = args->family;
    ev.sport = args->sport;
    ev.dport = args->dport;
    TT_COPY_ADDRS(&ev, args);
    tt_emit(args, &ev);
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
TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
    if (args->protocol != TT_IPPROTO_TCP)
        return 0;
    if (!tt_wanted(args->family, args->sport, args->dport))
        return 0;
    struct tt_event ev = {};
    ev.kind = TT_SOCK_ERROR;
    tt_task(&ev);
    ev.err = args->error;
    ev.family = args->family;
    ev.sport = args->sport;
    ev.dport = args->dport;
    TT_COPY_ADDRS(&ev, args);
    tt_emit(args, &ev);
    return 0;
}
#endif

#ifdef TT_HOOK_RETRANS
/* SYN retransmissions only: data retransmits are a different tool's business and can be
 * numerous enough to cost real overhead. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    if (args->state != TT_SYN_SENT)
        return 0;
    if (!tt_wanted(args->family, args->sport, args->dport))
        return 0;
    u64 sk = (u64)args->skaddr;
    struct tt_event *e = socks.lookup(&sk);
    if (e) {                        /* counted with the socket's pending CLOSE->SYN_SENT */
        if (e->retrans < 255)
            e->retrans++;
        return 0;
    }
    struct tt_event ev = {};
    ev.kind = TT_RETRANS;
    tt_task(&ev);
    ev.skaddr = (u64)args->skaddr;
    ev.oldstate = args->state;
    ev.family = args->family;
    ev.sport = args->sport;
    ev.dport = args->dport;
    TT_COPY_ADDRS(&ev, args);
    tt_emit(args, &ev);
    return 0;
}
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
