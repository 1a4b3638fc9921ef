/* tcptrace wire contract: the one record every BPF program emits, and the runtime config.
 *
 * Python never keeps a copy of this layout: it asks BCC for the compiled struct and derives its
 * decoder from that (tcptrace/wire.py: decoder_for), so this file is the single source of truth.
 * Fixed-width fields only, spelled with BCC's u8..u64 names (the ones its event decoder knows); one layout for IPv4 and IPv6 (16-byte addresses plus family).
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

/* What a record reports. Keep in sync with tcptrace/events.py:Kind (checked by a unit test that
 * parses this header). */
#define TT_STATE        1   /* sock:inet_sock_set_state: oldstate -> newstate */
#define TT_RECV_RESET   2   /* tcp:tcp_receive_reset: the peer reset this socket */
#define TT_SEND_RESET   3   /* tcp:tcp_send_reset (raw): we sent a reset on this socket */
#define TT_SOCK_ERROR   4   /* sock:inet_sk_error_report: err = errno; no skaddr in the tracepoint */
#define TT_RETRANS      5   /* tcp:tcp_retransmit_skb in SYN_SENT: a SYN retransmission */
#define TT_CONNECT_RET  6   /* connect failed before any state change: err = -errno, aux = fd or 0 */
#define TT_SYNACK       7   /* tcp:tcp_retransmit_synack: a listener (skaddr) retransmitted the
                             * SYN-ACK of a request (its 4-tuple, local side first); aux = the
                             * listener's network namespace (inode), 0 if unknown */
#define TT_KIND_MAX     8

/* flags */
#define TT_F_KPROBE     0x01  /* TT_CONNECT_RET came from the tcp_v{4,6}_connect kretprobe */
#define TT_F_SYSCALL    0x02  /* TT_CONNECT_RET came from syscalls:sys_exit_connect */
#define TT_F_OWNER      0x04  /* TT_STATE: pid/tid/comm are the task of a step a process makes
                               * itself (connect, listen, close, shutdown): the owner */
#define TT_F_HELD       0x08  /* TT_STATE: a held socket's steps sent early (bpf/hold.c:
                               * held); the same steps may come again in its next record, and
                               * ts_ns is when this was sent, not the newest step's */
#define TT_F_REASON     0x10  /* TT_SEND_RESET: aux is the reset's reason (enum sk_rst_reason of
                               * the running kernel) */

/* A TT_STATE record carries up to TT_MAX_STEPS transitions of one socket, oldest first. The
 * kernel keeps a socket's transitions in the `socks` map and sends them as one record when the
 * socket reaches ESTABLISHED, LISTEN or CLOSE (or the record is full); user space also reads the
 * map on a timer, so a socket resting in between (SYN_SENT, CLOSE_WAIT, FIN_WAIT2...) is seen
 * without waiting for its next transition. At ESTABLISHED the steps are held a short while
 * instead (`held`), so that a connection closing soon is one record. The maps' values are this
 * same struct. */
#define TT_MAX_STEPS    6

struct tt_event {
    u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC; TT_STATE: the newest step's */
    u64 skaddr;       /* struct sock address: an opaque key, never dereferenced */
    u32 pid;          /* tgid of the current task (TT_STATE: see TT_F_OWNER) */
    u32 tid;
    s32 err;          /* errno (TT_SOCK_ERROR; TT_STATE ending SYN_SENT -> CLOSE: the socket's
                       * sk_err, where BTF gives its offset, else 0), return code
                       * (TT_CONNECT_RET) */
    u32 aux;          /* fd (TT_CONNECT_RET), network namespace (TT_SYNACK; TT_STATE of a
                       * listener or its child, else 0), reason (TT_SEND_RESET with
                       * TT_F_REASON) */
    u16 sport;        /* host byte order */
    u16 dport;
    u8  kind;         /* TT_* */
    u8  family;       /* AF_INET (2) or AF_INET6 (10) */
    u8  oldstate;     /* TCP_* as in include/net/tcp_states.h; TT_STATE: the newest step's */
    u8  newstate;
    u8  flags;        /* TT_F_* */
    u8  _pad[7];
    u8  saddr[16];    /* IPv4 in the first 4 bytes */
    u8  daddr[16];
    char  comm[16];
    /* The members below are TT_STATE's, in the order tcptrace/events.py:Event names them (so
     * the decoder needs no permutation). */
    u8  nsteps;       /* steps used, 1..TT_MAX_STEPS */
    u8  retrans;      /* SYN retransmissions while these steps were pending */
    u8  _pad2[6];
    u64 rst_ns;       /* when the peer reset the socket while steps were pending, or 0 */
    u64 step_ts[TT_MAX_STEPS];
    u32 step_pid[TT_MAX_STEPS];   /* the task current at each step (a bystander in softirq) */
    u8  step_old[TT_MAX_STEPS];
    u8  step_new[TT_MAX_STEPS];
};

/* Runtime filters, written by user space into the one-entry `config` array after load, so one
 * compiled program serves every option set. */
struct tt_config {
    u16 family;       /* 0: any, else AF_INET / AF_INET6 */
    u8  port_filter;  /* 1: only sockets with sport or dport in the `ports` map */
    u8  armed;        /* 0 until user space has written everything else: BCC attaches while
                       * loading, and records from before then would ignore the filters */
    u32 hold_us;      /* how long an ESTABLISHED socket's steps wait for its close (TT_HOLD);
                       * 0: sent at once */
    u8  fold;         /* 1: healthy short connections are folded into `agg` (bpf/aggregate.c)
                       * instead of being sent */
    u8  _pad[7];
};

/* The kernel's aggregates of healthy connections (bpf/aggregate.c): one entry per key, values
 * per CPU, cumulative; user space reads them on a timer (tcptrace/kernel/source.py). */
#define TT_AGG_PASSIVE  0x01  /* shape: an accepted connection (else a connect()) */
#define TT_AGG_REMOTE   0x02  /* shape: the peer closed first (else we did) */
#define TT_AGG_OTHER    0x80  /* the key count reached its bound: addr, port and comm zeroed */

struct tt_agg_key {
    u8  family;
    u8  shape;        /* TT_AGG_* */
    u16 port;         /* the peer's port (connect) or ours (accept), host byte order */
    u8  addr[16];     /* the peer's address (connect) or ours (accept) */
    char comm[16];    /* the owner's command */
};

/* TT_H_N: the buckets of tcptrace/histogram.py, passed by the loader with the thresholds */
struct tt_agg {
    u64 count;        /* connections */
    u64 hs_sum;       /* handshake ns, summed (connects) */
    u64 hs_max;       /* the largest handshake ns */
    u64 life_sum;     /* first step to CLOSE, ns, summed */
    u32 hs[TT_H_N];   /* handshakes per bucket (tcptrace/histogram.py) */
};

#endif
