/* The bucket of a handshake time, as tcptrace/histogram.py: bucket() computes it; the loader
 * passes that module's constants as TT_H_* macros. No maps here, so a test program can include
 * it alone (tests/kernel/test_histogram_kernel.py checks it against the Python on every bound).
 * Part of tcptrace.c. */

static __always_inline u32 tt_hbucket(u64 v)
{
    if (v < 1000)
        return 0;
    u64 us = v / 1000;
    if (us >> TT_H_OCTAVES)
        return TT_H_N - 1;
    u32 o = 0;
    if (us >> 16) { us >>= 16; o += 16; }
    if (us >> 8) { us >>= 8; o += 8; }
    if (us >> 4) { us >>= 4; o += 4; }
    if (us >> 2) { us >>= 2; o += 2; }
    if (us >> 1) { o += 1; }
    u64 m = (v << 10) / (1000ULL << o);
    u32 sub = (m >= TT_H_T1) + (m >= TT_H_T2) + (m >= TT_H_T3) + (m >= TT_H_T4) +
              (m >= TT_H_T5) + (m >= TT_H_T6) + (m >= TT_H_T7);
    u32 b = 1 + o * TT_H_SUB + sub;
    return b < TT_H_N ? b : TT_H_N - 1;
}
