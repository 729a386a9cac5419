/* SPDX-License-Identifier: Apache-2.0 */
/* Internet checksum helpers (RFC 1071), without helper calls. */
#ifndef FL_CSUM_H
#define FL_CSUM_H

#include <uapi/linux/ip.h>

static __always_inline __u16 fl_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Checksum of an option-less IPv4 header: with iph->check zeroed it is the
 * value to store; over a received header it is 0 when the header is intact.
 */
static __always_inline __u16 fl_ipv4_hdr_csum(const struct iphdr *iph)
{
	const __u16 *word = (const __u16 *)iph;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*iph) >> 1); i++)
		sum += word[i];
	return fl_csum_fold(sum);
}

/*
 * The header checksum after TTL - 1, as the kernel's ip_decrease_ttl()
 * computes it (RFC 1624 incremental update of the TTL's 16-bit word).
 */
static __always_inline __sum16 fl_csum_after_ttl_decrement(__sum16 check)
{
	__u32 sum = (__u32)check + (__u32)bpf_htons(0x0100);

	return (__sum16)(sum + (sum >= 0xffff));
}

static __always_inline void fl_ipv4_decrease_ttl(struct iphdr *iph)
{
	iph->check = fl_csum_after_ttl_decrement(iph->check);
	iph->ttl--;
}

#endif /* FL_CSUM_H */
