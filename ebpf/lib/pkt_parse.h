/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Header parsing on linear packet memory [data, data_end), shared by XDP and
 * tc. Parsers never judge what is not theirs to judge: anything odd is
 * reported as a PASS_* reason so the kernel's own checks decide its fate.
 */
#ifndef FL_PKT_PARSE_H
#define FL_PKT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/tcp.h>
#include "common.h"

#define FL_IP_MF 0x2000
#define FL_IP_OFFSET 0x1fff

static __always_inline int fl_mac_is_multicast(const __u8 *mac)
{
	return mac[0] & 1; /* the I/G bit; broadcast included */
}

static __always_inline int fl_eth_is_vlan(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

static __always_inline int fl_mac_equal(const __u8 *a, const __u8 *b)
{
	const __u16 *x = (const __u16 *)a, *y = (const __u16 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2])) == 0;
}

/*
 * An IPv4 header at iph, with ip_room bytes of packet from it on (which may be
 * more than is linear): FL_STAT_NONE when it is whole and consistent.
 */
static __always_inline __u32 fl_check_ipv4(const struct iphdr *iph, void *data_end, __u32 ip_room)
{
	__u32 tot_len;

	if ((void *)(iph + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return FL_STAT_PASS_MALFORMED;
	tot_len = bpf_ntohs(iph->tot_len);
	/* Shorter than its header, or longer than what arrived: ip_rcv drops it. */
	if (tot_len < (__u32)iph->ihl * 4 || tot_len > ip_room)
		return FL_STAT_PASS_MALFORMED;
	return FL_STAT_NONE;
}

/*
 * Ethernet + IPv4 at data, for a packet of pkt_len bytes in all (which may be
 * more than is linear). IPv4 options are allowed here; callers that cannot
 * handle them check ihl. Returns FL_STAT_NONE with eth_out and iph_out set,
 * or why not.
 */
static __always_inline __u32 fl_parse_eth_ipv4(void *data, void *data_end, __u32 pkt_len,
						struct ethhdr **eth_out, struct iphdr **iph_out)
{
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	__u32 stat;

	if ((void *)(eth + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	if (fl_eth_is_vlan(eth->h_proto)) /* not ours to untag */
		return FL_STAT_PASS_VLAN_TAGGED;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return FL_STAT_PASS_NOT_IPV4;
	stat = fl_check_ipv4(iph, data_end, pkt_len - sizeof(*eth));
	if (stat != FL_STAT_NONE)
		return stat;
	*eth_out = eth;
	*iph_out = iph;
	return FL_STAT_NONE;
}

/*
 * tc only: make the first `want` bytes (or the whole packet if shorter) linear
 * so direct packet access can see them. Headers are nearly always linear
 * already; the pull is the rare slow path (it may reallocate the head).
 */
static __always_inline void fl_skb_linearize(struct __sk_buff *skb, __u32 want)
{
	__u32 need = skb->len < want ? skb->len : want;

	if ((void *)(long)skb->data + need > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, need);
}

#endif /* FL_PKT_PARSE_H */
