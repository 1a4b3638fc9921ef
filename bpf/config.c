/* What user space configured: the runtime filters and the hold time, written into maps after
 * load (tcptrace/kernel/loader.py: Programs.configure), so one compiled program serves every
 * option set. Part of tcptrace.c. */

/* config: one entry, written by user space after load (armed last), read on every hit. Never
 * deleted. */
BPF_ARRAY(config, struct tt_config, 1);
/* ports: port filter set (host byte order), filled by user space after load, never changed. */
BPF_HASH(ports, u16, u8, 64);

/* The config once user space has armed it (BCC attaches while loading, so hits come before the
 * filters are in); 0 before. */
static __always_inline struct tt_config *tt_config(void)
{
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    return c && c->armed ? c : 0;
}

/* Does the user want records of a socket with these fields? */
static __always_inline int tt_wanted(u16 family, u16 sport, u16 dport)
{
    struct tt_config *c = tt_config();
    if (!c)
        return 0;
    if (c->family && c->family != family)
        return 0;
    if (c->port_filter && !ports.lookup(&sport) && !ports.lookup(&dport))
        return 0;
    return 1;
}

static __always_inline u32 tt_hold_us(void)
{
    int zero = 0;
    struct tt_config *c = config.lookup(&zero);
    return c ? c->hold_us : 0;
}
