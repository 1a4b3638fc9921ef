/* tcptrace kernel side: TCP state transitions and the facts that explain failed connects.
 *
 * Reads a socket's fields at offsets from the running kernel's BTF (raw.c, the programs of every
 * kernel with BTF), or, without BTF, from the tracepoints' records (laid out by BCC from
 * tracefs, so right on any kernel); other pointers are opaque keys. Nothing dereferences a
 * kernel struct through the headers BCC compiles against, which may belong to another kernel
 * version than the one running.
 *
 * BCC compiles one source text, and rewrites its map calls (`socks.lookup(&k)`) and tracepoint
 * arguments only in that text, not in the files it #includes. So the loader puts each part
 * below in place of its #include (tcptrace/kernel/loader.py: source), with #line markers that
 * keep compiler messages naming the part's own file and line. Each part comes after the parts
 * it uses; the programs come last:
 *   config.c     what user space configured: the config and ports maps
 *   record.c     filling a tt_event (tcptrace.h, the wire contract): task, socket fields
 *   transport.c  the events ring or perf buffer, the spill buffer, drop counts
 *   hold.c       held opens: ESTABLISHED sockets' steps waiting for the close
 *   connect.c    connects that fail before any state change (kprobes or syscall tracepoints)
 *   state.c      the socks map: a socket's transitions grouped into one record
 *   facts.c      resets, error reports, SYN retransmissions
 *   raw.c        the programs on raw tracepoints (with BTF), each with its twin
 *   listen.c     listener facts: SYN-ACK retransmits, accept queues full at the final ACK
 *
 * Compile-time switches (-D). The plan's, chosen by tcptrace/kernel/probes.py (SWITCHES):
 *   TT_RINGBUF=1            BPF ring buffer transport (else a perf event array)
 *   TT_HOOK_*=1             each optional tracepoint the running kernel has: BCC fails to
 *                           compile a probe whose tracepoint is missing
 *   TT_KPROBES=1            the tcp_v{4,6}_connect kprobe pair (the kernel has kprobes)
 *   TT_SYSCALL_CONNECT=1    else syscalls:sys_{enter,exit}_connect
 *   TT_HOLD=1               hold ESTABLISHED sockets' steps (queue maps, 4.20)
 *   TT_RESCUE=1             raw tracepoint programs and their twins (raw.c), with TT_OFF_*
 *                           (struct sock and task_struct member offsets) and TT_SZ_STACK
 *                           (THREAD_SIZE) of the running kernel, from its BTF
 *                           (tcptrace/kernel/btf.py); with them, a failed connect's CLOSE
 *                           record carries its sk_err (state.c: tt_close_err). Else the
 *                           tracepoint programs below
 *   TT_TYPED=1              with TT_RESCUE: raw.c's programs are loaded as typed tracepoints
 *                           (tp_btf) and read the socket directly, not by probe reads
 *   TT_SOCK_ID=1            a listener's namespace, family and port, at TT_OFF_* from BTF
 *   TT_LISTEN_OVERFLOW=1    skb:kfree_skb's TCP_LISTEN_OVERFLOW drops, with the reason's number
 *                           and the raw arguments' positions of the running kernel (BTF)
 *   TT_RST_REASON=1         tcp_send_reset's reason, at TT_RST_REASON_ARG (BTF)
 * (The values a switch needs from the running kernel are Plan.consts, as -DTT_<name>=<value>.)
 * Every plan's, from tcptrace/kernel/loader.py:
 *   TT_RINGBUF_PAGES=n      ring size in pages (power of two)
 *   TT_OWNER_STEP(o,n), TT_OPENING_STEP(o,n), TT_SEND_AT(n)
 *                           which transitions name the owner, start a new socket, send what is
 *                           pending: tcptrace/lifecycle/rules.py, as user space reads them
 * Tests only: TT_RESCUE_ONLY=1 (raw.c).
 */
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include "tcptrace.h"

/* The states and numbers the programs name themselves (include/net/tcp_states.h, uapi). */
#define TT_ESTABLISHED 1
#define TT_SYN_SENT 2
#define TT_SYN_RECV 3
#define TT_FIN_WAIT1 4
#define TT_FIN_WAIT2 5
#define TT_CLOSE 7
#define TT_CLOSE_WAIT 8
#define TT_LAST_ACK 9
#define TT_LISTEN 10
#define TT_IPPROTO_TCP 6
#define TT_EINPROGRESS 115
#define TT_EADDRNOTAVAIL 99

#include "config.c"
#include "record.c"
#include "transport.c"
#include "hold.c"
#include "histogram.c"
#include "aggregate.c"
#include "connect.c"
#include "state.c"
#include "facts.c"
#include "listen.c"

/* hits: runs of the programs of each kind (raw.c's first programs, or the tracepoint programs
 * below), per CPU: incremented first thing on every run, never reset.
 * With the kernel's recursion misses of the program, what BPF was shown of the hook, which user
 * space sets against a count of the tracepoint's hits that needs no BPF (kernel/tally.py). */
BPF_PERCPU_ARRAY(hits, u64, TT_KIND_MAX);

static __always_inline void tt_hit(u32 kind)
{
    u64 *n = hits.lookup(&kind);
    if (n)
        (*n)++;
}

#ifdef TT_HOOK_SEND_RESET
/* A raw tracepoint, because the regular one's record differs between kernels in ways BCC cannot
 * compile against foreign headers (6.10+ adds `enum sk_rst_reason`, unknown to 6.1 headers).
 * The first argument, the sock, is the same in every version. A NULL sock is a reset sent for no
 * socket (e.g. the answer to a SYN on a closed port): the other end's TT_RECV_RESET tells that. */
RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    u64 sk = ctx->args[0];
    if (!sk || !tt_config())
        return 0;
    struct tt_event ev = {};
    ev.kind = TT_SEND_RESET;
    tt_task(&ev);
    ev.skaddr = sk;
#ifdef TT_RST_REASON
    /* Why (6.10+: enum sk_rst_reason, numbered as the running kernel numbers it; the argument's
     * position comes from its BTF, tcptrace/kernel/probes.py: reset_reasons). */
    ev.aux = (u32)ctx->args[TT_RST_REASON_ARG];
    ev.flags = TT_F_REASON;
#endif
    tt_emit(ctx, &ev);
    return 0;
}
#endif

#ifdef TT_RESCUE
#include "raw.c"
#else
/* Without BTF: the tracepoints' own records. */

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    tt_hit(TT_STATE);
    if (args->protocol == TT_IPPROTO_TCP) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_state(args, (u64)args->skaddr, args->oldstate, args->newstate, &s);
        tt_flush(args);
    }
    return 0;
}

#ifdef TT_HOOK_RECV_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    tt_hit(TT_RECV_RESET);
    struct tt_sk s = {};
    TT_SK_FROM_ARGS(&s, args);
    tt_recv_reset(args, (u64)args->skaddr, &s);
    return 0;
}
#endif

#ifdef TT_HOOK_SOCK_ERROR
TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
    tt_hit(TT_SOCK_ERROR);
    if (args->protocol == TT_IPPROTO_TCP) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_sock_error(args, 0, args->error, &s);
    }
    return 0;
}
#endif

#ifdef TT_HOOK_RETRANS
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    tt_hit(TT_RETRANS);
    if (args->state == TT_SYN_SENT) {
        struct tt_sk s = {};
        TT_SK_FROM_ARGS(&s, args);
        tt_retrans(args, (u64)args->skaddr, &s);
    }
    return 0;
}
#endif
#endif   /* TT_RESCUE */
