/* Connects that fail before any state change (no route, no local port, a cgroup/BPF or LSM
 * denial): no transition, reset or error report tells them, so the connect call itself is
 * watched. With kprobes, tcp_v{4,6}_connect's return (TT_KPROBES); without, the connect()
 * syscall's (TT_SYSCALL_CONNECT). Part of tcptrace.c. */

/* Where a connect() goes, from the sockaddr it was given (uapi layout: the same on every
 * kernel). */
struct tt_dest {
    u16 family;
    u16 dport;        /* host byte order */
    u8 daddr[16];
};

static __always_inline int tt_read(void *dst, u32 size, const void *src, int user)
{
    return user ? bpf_probe_read_user(dst, size, src) : bpf_probe_read_kernel(dst, size, src);
}

/* The destination at sa, read from user memory (the syscall's argument) or kernel memory (the
 * kernel's copy); 0 if it is not AF_INET or AF_INET6. */
static __always_inline int tt_read_dest(struct tt_dest *d, struct sockaddr *sa, int user)
{
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    tt_read(&d->family, sizeof(d->family), &sa->sa_family, user);
    if (d->family == AF_INET) {
        tt_read(&d->dport, 2, &in->sin_port, user);
        tt_read(d->daddr, 4, &in->sin_addr, user);
    } else if (d->family == AF_INET6) {
        tt_read(&d->dport, 2, &in6->sin6_port, user);
        tt_read(d->daddr, 16, &in6->sin6_addr, user);
    } else {
        return 0;
    }
    d->dport = ntohs(d->dport);
    return 1;
}

/* A connect that failed before its SYN: err is the return code, fd the descriptor (0 where the
 * hook cannot tell), flag which hook saw it. */
static __always_inline void tt_connect_failed(void *ctx, struct tt_dest *d, u64 sk, s32 err,
                                              u32 fd, u8 flag)
{
    if (!tt_wanted(d->family, 0, d->dport))
        return;
    struct tt_event ev = {};
    ev.kind = TT_CONNECT_RET;
    tt_task(&ev);
    ev.skaddr = sk;
    ev.err = err;
    ev.aux = fd;
    ev.flags = flag;
    ev.family = d->family;
    ev.dport = d->dport;
    __builtin_memcpy(ev.daddr, d->daddr, 16);
    tt_emit(ctx, &ev);
}

#ifdef TT_KPROBES
/* connect_sk: per thread, tcp_v{4,6}_connect entry to return. Inserted at entry, deleted at
 * return; LRU so a lost return cannot leak. Value: the sock pointer (a key, never read) and the
 * destination, from the kernel's own copy of the user's sockaddr. */
struct tt_csk {
    u64 skaddr;
    struct tt_dest dest;
};
BPF_TABLE("lru_hash", u32, struct tt_csk, connect_sk, 4096);

static __always_inline int tt_connect_entry(struct pt_regs *ctx, void *sk, struct sockaddr *uaddr)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tt_csk c = {};
    c.skaddr = (u64)sk;
    tt_read_dest(&c.dest, uaddr, 0);
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
    /* Success (0) is told by the CLOSE->SYN_SENT transition. A failure came before it, or
     * after it inside tcp_v{4,6}_connect() (EADDRNOTAVAIL: no local port): user space tells
     * the two apart by the socket's transitions. */
    if (ret != 0)
        tt_connect_failed(ctx, &c->dest, c->skaddr, ret, 0, TT_F_KPROBE);
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
#ifdef TT_CONNECT_REGS
/* connect()'s failures, from its return alone: the call's arguments are in the registers the
 * kernel saved at entry (bpf_task_pt_regs(), 5.15; TT_OFF_REGS_* from BTF), so no program runs on
 * sys_enter_connect. That one matters beyond connect(): any program on a syscall's entry
 * tracepoint sends every system call of every process through the entry slow path, which cost
 * the loopback storm about 4% of its rate on a host where kernel entry is expensive
 * (docs/bench.md). Told failures (TT_CONNECT_TOLD: lifecycle/rules.py) return at once; the rest
 * are rare and carry the socket behind the descriptor, so that user space can tell a failure
 * the transitions already tell from one before any SYN (detect/failure.py). */

/* The struct sock behind descriptor fd of the current task, or 0: current->files->fdt->fd[fd]
 * ->private_data->sk. A descriptor that is no socket gives a number no socket has (probe reads
 * cannot fault); user space drops what is not a TCP socket by its descriptor. */
static __always_inline u64 tt_fd_sock(u32 fd)
{
    u64 files = 0, fdt = 0, fds = 0, file = 0, sock = 0, sk = 0;
    u32 max = 0;
    u64 task = bpf_get_current_task();
    bpf_probe_read_kernel(&files, 8, (void *)(task + TT_OFF_TASK_FILES));
    if (!files || bpf_probe_read_kernel(&fdt, 8, (void *)(files + TT_OFF_FILES_FDT)) || !fdt)
        return 0;
    bpf_probe_read_kernel(&max, 4, (void *)(fdt + TT_OFF_FDT_MAX));
    if (fd >= max || bpf_probe_read_kernel(&fds, 8, (void *)(fdt + TT_OFF_FDT_FD)) || !fds)
        return 0;
    if (bpf_probe_read_kernel(&file, 8, (void *)(fds + 8 * (u64)fd)) || !file)
        return 0;
    if (bpf_probe_read_kernel(&sock, 8, (void *)(file + TT_OFF_FILE_DATA)) || !sock)
        return 0;
    bpf_probe_read_kernel(&sk, 8, (void *)(sock + TT_OFF_SOCKET_SK));
    return sk;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    long ret = args->ret;
    if (ret >= 0 || TT_CONNECT_TOLD(-ret))
        return 0;
    u64 regs = (u64)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 fd = 0, uaddr = 0;
    bpf_probe_read_kernel(&fd, 8, (void *)(regs + TT_OFF_REGS_FD));
    bpf_probe_read_kernel(&uaddr, 8, (void *)(regs + TT_OFF_REGS_ADDR));
    struct tt_dest d = {};
    if (!tt_read_dest(&d, (struct sockaddr *)uaddr, 1))
        return 0;
    tt_connect_failed(args, &d, tt_fd_sock((u32)fd), ret, (u32)fd, TT_F_SYSCALL);
    return 0;
}

/* No connect() waits to hear of its SYN: user space matches the socket. */
static __always_inline void tt_connect_syn_sent(u64 id, u64 sk) {}
#else
/* Without BTF to find the call's arguments at its return: kept from its entry. */
/* connecting: per thread, from sys_enter_connect to sys_exit_connect. Inserted on enter for
 * inet sockaddrs, deleted on exit; skaddr is set by the CLOSE->SYN_SENT transition in between
 * (tt_connect_syn_sent), which marks "the kernel got as far as sending a SYN". LRU so a thread
 * killed mid-syscall cannot leak an entry forever. */
struct tt_connecting {
    u64 skaddr;
    u32 fd;
    struct tt_dest dest;
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
    if (!tt_read_dest(&c.dest, (struct sockaddr *)args->uservaddr, 1))
        return 0;
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
    /* Failures that happened before a SYN went out (no SYN_SENT seen in this call) are told by
     * nothing else. After CLOSE -> SYN_SENT the transitions, resets and error reports tell the
     * rest, but for one errno: EADDRNOTAVAIL, no local port for the destination
     * (inet_hash_connect() in tcp_v{4,6}_connect()), which sets no socket error. It is sent with
     * the socket, and user space gives it to the attempt the transitions told. The socket's
     * protocol is not visible here; user space checks the fd (tcptrace/host/owners.py). */
    if (ret < 0 && ret != -TT_EINPROGRESS && (c->skaddr == 0 || ret == -TT_EADDRNOTAVAIL))
        tt_connect_failed(args, &c->dest, c->skaddr, ret, c->fd, TT_F_SYSCALL);
    connecting.delete(&tid);
    return 0;
}
#endif   /* TT_CONNECT_REGS */
#else
/* Without the syscall hook no connect() waits to hear of its SYN. */
static __always_inline void tt_connect_syn_sent(u64 id, u64 sk) {}
#endif
