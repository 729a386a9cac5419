/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one hook through which the benchmark (bench/prog.py) and the cost
 * tests time the programs: every entry point is declared with
 * FL_PROGRAM(name, context type, context name). A product build leaves it
 * the plain `int name(ctx)`; nothing else in the programs knows about
 * timing.
 *
 * BPF_PROG_TEST_RUN repeats a program on the packet the previous run left
 * behind, so a program that rewrites the packet is timed on garbage after the
 * first run. A timing build (-DFL_TIMING) makes each entry point a wrapper
 * that saves the first FL_TIMING_SAVE_<name> bytes of the packet (every byte
 * the program may rewrite in place; the build defines one per program, and a
 * missing one is a compile error), runs the program, and puts the packet back
 * as it came: the head adjustment undone, the saved bytes stored back. A
 * packet shorter than that gets its first FL_TIMING_SAVE_SMALL bytes saved.
 * The restore is inside the timed region; the bench reports its cost.
 *
 * FL_ENCAP_ADJ_FLAGS(flags): the flags of the encapsulating
 * bpf_skb_adjust_room(). With the ENCAP_* flags the kernel marks the skb as a
 * tunnel packet once and for good (no helper clears skb->encapsulation), so a
 * repeat fails with EALREADY; a timing build passes only FIXED_GSO, which does
 * the same memory work (cow, push, memmove) without that bookkeeping.
 */
#ifndef FL_TIMING_H
#define FL_TIMING_H

#ifndef FL_TIMING

#define FL_PROGRAM(name, ctx_type, ctx) int name(ctx_type *ctx)
#define FL_ENCAP_ADJ_FLAGS(flags) (flags)

#else /* FL_TIMING */

#define FL_ENCAP_ADJ_FLAGS(flags) BPF_F_ADJ_ROOM_FIXED_GSO
#ifndef FL_TIMING_SAVE_SMALL
#define FL_TIMING_SAVE_SMALL 34 /* Ethernet + IPv4 header */
#endif

/*
 * Copies in 8-byte words with direct packet access: a few loads and stores,
 * not bpf_*_load_bytes/store_bytes (~60 ns a pair) nor __builtin_memcpy (byte
 * by byte on packet pointers of unknown alignment), whose cost would drown
 * the programs'.
 */
static __always_inline void fl_timing_copy(void *dst, const void *src, const int size)
{
#pragma unroll
	for (int i = 0; i + 8 <= size; i += 8)
		*(__u64 *)(dst + i) = *(const __u64 *)(src + i);
	if (size % 8 >= 4)
		*(__u32 *)(dst + (size & ~7)) = *(const __u32 *)(src + (size & ~7));
	if (size % 4 >= 2)
		*(__u16 *)(dst + (size & ~3)) = *(const __u16 *)(src + (size & ~3));
}

/* Give the packet back the length it came with. */
static __always_inline void fl_timing_undo_tc(struct __sk_buff *skb, __u32 before, __u32 after)
{
	bpf_skb_adjust_room(skb, (__s32)before - (__s32)after, BPF_ADJ_ROOM_MAC, 0);
}

static __always_inline void fl_timing_undo_xdp(struct xdp_md *ctx, __u32 before, __u32 after)
{
	bpf_xdp_adjust_head(ctx, (int)after - (int)before);
}

#define fl_timing_undo(ctx, before, after) \
	_Generic((ctx), struct __sk_buff *: fl_timing_undo_tc, struct xdp_md *: fl_timing_undo_xdp)(ctx, before, after)

#define FL_PROGRAM(name, ctx_type, ctx)                                                        \
	static __always_inline int name##__timed(ctx_type *ctx);                               \
	int name(ctx_type *ctx)                                                                \
	{                                                                                      \
		__u64 saved[(FL_TIMING_SAVE_##name + 7) / 8];                                  \
		void *data = (void *)(long)ctx->data;                                          \
		void *data_end = (void *)(long)ctx->data_end;                                  \
		__u32 len_before = data_end - data, len_after, kept = 0;                       \
		int verdict;                                                                   \
                                                                                               \
		if (data + FL_TIMING_SAVE_##name <= data_end) {                                \
			fl_timing_copy(saved, data, FL_TIMING_SAVE_##name);                    \
			kept = FL_TIMING_SAVE_##name;                                          \
		} else if (data + FL_TIMING_SAVE_SMALL <= data_end) {                          \
			fl_timing_copy(saved, data, FL_TIMING_SAVE_SMALL);                     \
			kept = FL_TIMING_SAVE_SMALL;                                           \
		}                                                                              \
		verdict = name##__timed(ctx);                                                  \
		len_after = (long)ctx->data_end - (long)ctx->data;                             \
		if (len_after != len_before)                                                   \
			fl_timing_undo(ctx, len_before, len_after);                            \
		data = (void *)(long)ctx->data;                                                \
		data_end = (void *)(long)ctx->data_end;                                        \
		if (kept == FL_TIMING_SAVE_##name && data + FL_TIMING_SAVE_##name <= data_end) \
			fl_timing_copy(data, saved, FL_TIMING_SAVE_##name);                    \
		else if (kept == FL_TIMING_SAVE_SMALL && data + FL_TIMING_SAVE_SMALL <= data_end) \
			fl_timing_copy(data, saved, FL_TIMING_SAVE_SMALL);                     \
		return verdict;                                                                \
	}                                                                                      \
	static __always_inline int name##__timed(ctx_type *ctx)

#endif /* FL_TIMING */

#endif /* FL_TIMING_H */
