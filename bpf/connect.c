/* Connects that fail before any state change (no route, no local port, a cgroup/BPF or LSM
 * denial): no transition, reset or error report tells them, so the connect call itself is
 * watched. With kprobes, tcp_v{4,6}_connect's return (TT_KPROBES); without, the connect()
 * syscall's (TT_SYSCALL_CONNECT). Part of tcptrace.c. */

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
    /* Success (0) is told by the CLOSE->SYN_SENT transition; a failure here came before it. */
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
/* connecting: per thread, from sys_enter_connect to sys_exit_connect. Inserted on enter for
 * inet sockaddrs, deleted on exit; skaddr is set by the CLOSE->SYN_SENT transition in between
 * (tt_connect_syn_sent), which marks "the kernel got as far as sending a SYN". LRU so a thread
 * killed mid-syscall cannot leak an entry forever. */
struct tt_connecting {
    u64 skaddr;
    u32 fd;
    u16 family;
    u16 dport;
    u8 daddr[16];
};
BPF_TABLE("lru_hash", u32, struct tt_connecting, connecting, 4096);

/* A transition to SYN_SENT (state.c): if the thread is inside connect(), it got that far. */
static __always_inline void tt_connect_syn_sent(u64 id, u64 sk)
{
    u32 tid = (u32)id;
    struct tt_connecting *c = connecting.lookup(&tid);
    if (c)
        c->skaddr = sk;
}

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
#else
/* Without the syscall hook no connect() waits to hear of its SYN. */
static __always_inline void tt_connect_syn_sent(u64 id, u64 sk) {}
#endif
