/* SPDX-License-Identifier: Apache-2.0 */
/*
 * VXLAN (RFC 7348) as flannel's vxlan backend puts it on the wire through the
 * kernel vxlan device: encapsulation for tc, validation for decap in XDP/tc.
 */
#ifndef FL_VXLAN_H
#define FL_VXLAN_H

#include "pkt_parse.h"
#include "csum.h"

struct fl_vxlanhdr {
	__be32 flags; /* 0x08 (I: VNI valid) then 24 reserved bits */
	__be32 vni;   /* 24-bit VNI then 8 reserved bits */
};

#define FL_VXLAN_FLAG_VNI 0x08000000
/*
 * Group Based Policy (draft-smith-vxlan-group-policy), as the kernel's
 * vxlan_build_gbp_hdr() writes it from skb->mark: G flag, D (don't learn)
 * and A (policy applied) from mark bits 22 and 19, policy ID from bits 0-15.
 */
#define FL_VXLAN_FLAG_GBP 0x80000000
#define FL_GBP_DONT_LEARN (1U << 22)
#define FL_GBP_POLICY_APPLIED (1U << 19)
#define FL_GBP_ID_MASK 0xffffU
#define FL_OUTER_TTL 64 /* the kernel device's default: ip4_dst_hoplimit() */

/* Everything bpf_skb_adjust_room(+50) makes room for, plus the outer Ethernet. */
struct fl_vxlan_encap_hdr {
	struct ethhdr outer_eth;
	struct iphdr outer_ip;
	struct udphdr udp;
	struct fl_vxlanhdr vxlan;
	struct ethhdr inner_eth;
} __attribute__((packed));

/*
 * A packet on the uplink as decap sees it, as pointers into linear packet
 * memory: the outer headers once fl_parse_udp_to_port() has found UDP to our
 * port, the inner ones once fl_parse_vxlan() has validated the rest.
 */
struct fl_vxlan_view {
	struct ethhdr *outer_eth;
	struct iphdr *outer_ip;
	struct ethhdr *inner_eth;
	struct iphdr *inner_ip;
	__u8 tagged;          /* an in-band 802.1Q/802.1ad tag sits between Ethernet and IPv4 */
};

struct fl_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

#define FL_VXLAN_MIN_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) + \
			  sizeof(struct fl_vxlanhdr) + sizeof(struct ethhdr) + sizeof(struct iphdr))

/*
 * The kernel's udp_flow_src_port(): the flow hash, folded (it XORs the low
 * half into the high half so the port does not leak the hash), scaled into
 * [min, max). Same hash, same port as the kernel vxlan device would pick.
 */
static __always_inline __u16 fl_vxlan_src_port(__u32 hash, const struct fl_local_config *cfg)
{
	__u32 min = cfg->src_port_min, max = cfg->src_port_max;

	if (min >= max) { /* the kernel's default ip_local_port_range */
		min = 32768;
		max = 60999;
	}
	hash ^= hash << 16;
	return (__u16)((((__u64)hash * (max - min)) >> 32) + min);
}

/*
 * Outer IPv4 ID. DF is clear, so a router may fragment, and the ID must vary
 * from packet to packet between two hosts. The kernel counts per destination
 * bucket (ip_select_ident()); this CPU's count of packets it encapsulated is
 * such a counter at no cost, and a random helper call would cost ~40 ns.
 * CPUs start 8192 apart so that they do not count in step.
 */
static __always_inline __be16 fl_outer_ip_id(const struct fl_counter *encapsulated)
{
	__u32 seq = encapsulated ? (__u32)encapsulated->packets : 0;

	return bpf_htons((__u16)(seq + (bpf_get_smp_processor_id() << 13)));
}

/* The VXLAN flags word (host order) for a packet carrying `mark`. */
static __always_inline __u32 fl_vxlan_flags(const struct fl_local_config *cfg, __u32 mark)
{
	__u32 flags = FL_VXLAN_FLAG_VNI;

	if (!cfg->gbp || !mark) /* the kernel adds the extension only for a nonzero mark */
		return flags;
	flags |= FL_VXLAN_FLAG_GBP | (mark & FL_GBP_ID_MASK);
	if (mark & FL_GBP_DONT_LEARN)
		flags |= FL_GBP_DONT_LEARN;
	if (mark & FL_GBP_POLICY_APPLIED)
		flags |= FL_GBP_POLICY_APPLIED;
	return flags;
}

/* INET_ECN_encapsulate(0, inner): copy ECT, but CE becomes ECT(0) outside (RFC 6040). */
static __always_inline __u8 fl_outer_tos(__u8 inner_tos)
{
	__u8 ecn = inner_tos & 3;

	return ecn == 3 ? 2 : ecn;
}

static __always_inline __u32 fl_parse_udp_at(struct ethhdr *eth, struct iphdr *iph, void *data_end,
					     __u32 ip_room, __u16 port, int tagged, struct fl_vxlan_view *view)
{
	__u32 not_for_port = tagged ? FL_STAT_PASS_VLAN_TAGGED : FL_STAT_PASS_NOT_VXLAN;
	__u32 stat = fl_check_ipv4(iph, data_end, ip_room);
	struct udphdr *udp;

	if (stat != FL_STAT_NONE)
		return stat;
	view->outer_eth = eth;
	view->outer_ip = iph;
	if (iph->protocol != IPPROTO_UDP)
		return not_for_port;
	if (iph->frag_off & bpf_htons(FL_IP_OFFSET))
		return FL_STAT_PASS_OUTER_FRAGMENT;
	udp = iph->ihl == 5 ? (void *)(iph + 1) : (void *)iph + iph->ihl * 4;
	if ((void *)(udp + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	if (udp->dest != bpf_htons(port))
		return not_for_port;
	return FL_STAT_NONE;
}

/*
 * Is this UDP to our VXLAN port? Returns FL_STAT_NONE with the outer headers
 * in *view when it is (also with IPv4 options, as a first fragment or behind
 * one VLAN tag), else why not. A later fragment carries no ports: it is
 * PASS_OUTER_FRAGMENT, and without its first fragment the kernel never
 * reassembles it. For plain IPv4 that is not for the port, view->outer_eth
 * and view->outer_ip are set too (PASS_NOT_VXLAN).
 */
static __always_inline __u32 fl_parse_udp_to_port(void *data, void *data_end, __u32 pkt_len, __u16 port,
						  struct fl_vxlan_view *view)
{
	struct ethhdr *eth = data;
	struct fl_vlan_hdr *vlan;

	view->tagged = 0;
	if ((void *)(eth + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) /* the common case, at constant offsets */
		return fl_parse_udp_at(eth, (void *)(eth + 1), data_end, pkt_len - sizeof(*eth), port, 0, view);
	if (!fl_eth_is_vlan(eth->h_proto))
		return FL_STAT_PASS_NOT_IPV4;
	view->tagged = 1;
	vlan = (void *)(eth + 1);
	if ((void *)(vlan + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	if (vlan->encapsulated_proto != bpf_htons(ETH_P_IP))
		return FL_STAT_PASS_VLAN_TAGGED;
	return fl_parse_udp_at(eth, (void *)(vlan + 1), data_end, pkt_len - sizeof(*eth) - sizeof(*vlan), port, 1,
			       view);
}

/*
 * After fl_parse_udp_to_port(): is it VXLAN this node can decapsulate itself?
 * Returns FL_STAT_NONE with the inner headers in *view, or the PASS_ reason
 * (the kernel then judges, and its vxlan device may decapsulate). Checks what
 * the kernel would check before it decapsulates, because decap in XDP/tc
 * skips ip_rcv and udp_rcv: the outer header checksum, lengths, flags. The
 * outer UDP checksum is not verified (flannel peers send 0; the inner L4
 * checksum still protects the payload end to end). Untagged frames only.
 */
static __always_inline __u32 fl_parse_vxlan(void *data_end, const struct fl_local_config *cfg,
					    struct fl_vxlan_view *view)
{
	struct ethhdr *eth = view->outer_eth;
	struct iphdr *iph = view->outer_ip;
	struct udphdr *udp;
	struct fl_vxlanhdr *vxh;
	struct ethhdr *inner_eth;
	struct iphdr *inner_ip;
	__u32 udp_len;

	/* Fragments are reassembled by the kernel first; its vxlan device decaps. */
	if (iph->frag_off & bpf_htons(FL_IP_MF | FL_IP_OFFSET))
		return FL_STAT_PASS_OUTER_FRAGMENT;
	if (iph->ihl != 5)
		return FL_STAT_PASS_OUTER_IP_OPTIONS;
	/* Not to our address, or a frame the NIC saw promiscuously. */
	if (iph->daddr != cfg->underlay_ip || !fl_mac_equal(eth->h_dest, cfg->uplink_mac))
		return FL_STAT_PASS_NOT_VXLAN;
	if (fl_ipv4_hdr_csum(iph) != 0)
		return FL_STAT_PASS_OUTER_BAD_CSUM;
	udp = (void *)(iph + 1);
	vxh = (void *)(udp + 1);
	inner_eth = (void *)(vxh + 1);
	inner_ip = (void *)(inner_eth + 1);
	if ((void *)(inner_ip + 1) > data_end)
		return FL_STAT_PASS_MALFORMED;
	udp_len = bpf_ntohs(udp->len);
	if (udp_len < FL_VXLAN_MIN_LEN - sizeof(struct ethhdr) - sizeof(struct iphdr) ||
	    udp_len > (__u32)bpf_ntohs(iph->tot_len) - sizeof(struct iphdr))
		return FL_STAT_PASS_MALFORMED;
	/*
	 * The kernel drops unknown flags and reserved bits; let it. A GBP packet
	 * (G flag) goes to the kernel too: with Backend.GBP its device turns the
	 * policy into skb->mark, which XDP cannot set.
	 */
	if (vxh->flags != bpf_htonl(FL_VXLAN_FLAG_VNI) || (vxh->vni & bpf_htonl(0xff)))
		return FL_STAT_PASS_VXLAN_BAD_FLAGS;
	if (vxh->vni != bpf_htonl(cfg->vni << 8))
		return FL_STAT_PASS_WRONG_VNI;
	if (inner_eth->h_proto != bpf_htons(ETH_P_IP))
		return FL_STAT_PASS_INNER_NOT_IPV4;
	if (inner_ip->version != 4 || inner_ip->ihl < 5)
		return FL_STAT_PASS_MALFORMED;
	view->inner_eth = inner_eth;
	view->inner_ip = inner_ip;
	return FL_STAT_NONE;
}

#endif /* FL_VXLAN_H */
