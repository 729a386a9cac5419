/* SPDX-License-Identifier: Apache-2.0 */
/*
 * flannel-bpf, sending side: packets for a remote flannel subnet leave by the
 * uplink without the kernel's routing and vxlan device.
 *
 *   tc_encap_from_pods  tc ingress of each pod's host-side veth (the ports
 *                       of the pod bridge, cni0). Pods send off-subnet
 *                       traffic to the gateway MAC: we take it before the
 *                       bridge, bridge netfilter and the routing stack. We
 *                       are the router, so TTL - 1.
 *   tc_encap_from_host  tc egress of flannel.<VNI>: host-originated traffic
 *                       the kernel has already routed (TTL already done).
 *   tc_from_routed_pod  tc ingress of a routed pod's host-side veth (a pod
 *                       of flannel-bpf-cni, no bridge): everything the pod
 *                       sends is for its router; a pod of this node gets it
 *                       straight (bpf_redirect_peer).
 *   nk_from_pod         a netkit pod's egress (BPF_NETKIT_PEER: it runs in
 *                       the pod's transmit call). As above, but a pod of this
 *                       node gets it through bpf_redirect() to its host side:
 *                       the kernel honours peer redirects at tc ingress only.
 *
 * Whatever is not handled goes on untouched (TC_ACT_OK) along the kernel path:
 * the routes via flannel.<VNI>, kept as flanneld sets them up, are the safety
 * net. Unlike that path, this one skips the iptables FORWARD chain.
 */
#include "lib/common.h"
#include "lib/pkt_parse.h"
#include "lib/csum.h"
#include "lib/vxlan.h"

#define ENCAP_FLAGS (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | \
		     BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH | \
		     BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr)))

/* "Do not know": larger than any MTU, so the kernel gets the packet. */
#define LEN_UNKNOWN 0xffffffffU

/*
 * IPv4 length of what will go on the wire: the packet, or for a GSO packet
 * one segment (headers + gso_size), as skb_gso_validate_network_len() sees it.
 */
static __always_inline __u32 l3_len_on_wire(struct __sk_buff *skb, const struct iphdr *iph)
{
	__u32 ip_hdr_len = iph->ihl * 4;
	__u32 l4_hdr_len;
	__u8 doff_byte;

	if (!skb->gso_size)
		return skb->len - sizeof(struct ethhdr);
	if (iph->protocol == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + ip_hdr_len + 12, &doff_byte, 1))
			return LEN_UNKNOWN;
		l4_hdr_len = (doff_byte >> 4) * 4;
	} else if (iph->protocol == IPPROTO_UDP) {
		l4_hdr_len = sizeof(struct udphdr); /* UDP GSO (UDP_SEGMENT) */
	} else {
		return LEN_UNKNOWN;
	}
	return ip_hdr_len + l4_hdr_len + skb->gso_size;
}

/*
 * Out of the uplink, MACs from the neighbour table (ARP on a miss, like the
 * kernel's own output path). A DIRECT peer is on our L2 segment by definition,
 * so it is its own next hop. For VXLAN the peer may sit behind a router:
 * no next hop is given, and the helper looks the outer destination up in the
 * FIB (after the encap the network header is the outer one). The helper only
 * fails on bad arguments; a neighbour failure later drops the packet like
 * ip_output would.
 */
static __always_inline int redirect_to_neighbour(const struct fl_local_config *cfg, __be32 next_hop)
{
	struct bpf_redir_neigh nh = {
		.nh_family = AF_INET,
		.ipv4_nh = next_hop,
	};

	return fl_redirect_neigh(cfg->uplink_ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int redirect_by_fib(const struct fl_local_config *cfg)
{
	return fl_redirect_neigh(cfg->uplink_ifindex, NULL, 0, 0);
}

/*
 * VXLAN exactly as the kernel vxlan device flanneld configures writes it:
 * outer IPv4 underlay_ip -> peer, TTL 64, DF clear, ECN copied; UDP from the
 * flow-hash port to cfg->vxlan_port; flags 0x08 and our VNI; inner Ethernet
 * our VtepMAC -> the peer's VtepMAC. The outer UDP checksum is 0 (allowed for
 * IPv4 by RFC 7348, and the only value correct for every GSO segment).
 *
 * The headers are written in place (direct packet access) rather than built
 * on the stack and copied with bpf_skb_store_bytes(): one write per field,
 * and no helper call, which costs most on CPUs with return-thunk mitigations.
 */
static __always_inline int encap_vxlan(struct __sk_buff *skb, const struct fl_local_config *cfg,
				       const struct fl_peer *peer, const struct iphdr *iph,
				       __u32 len, int forwarding)
{
	/*
	 * The flow hash of the inner packet, as the kernel's skb_get_hash() gives
	 * it, taken before the resize. A socket's packets usually carry it already;
	 * reading it saves the helper call.
	 */
	__u32 hash = skb->hash ? skb->hash : bpf_get_hash_recalc(skb);
	struct fl_counter *encapsulated = fl_counter_of(FL_STAT_ENCAP_VXLAN);
	__u32 outer_l3_len = len - sizeof(struct ethhdr) + FL_VXLAN_OVERHEAD;
	__u8 inner_tos = iph->tos;
	struct fl_vxlan_encap_hdr *hdr;
	struct iphdr *inner_ip;
	void *data, *data_end;

	if (bpf_skb_adjust_room(skb, FL_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, FL_ENCAP_ADJ_FLAGS(ENCAP_FLAGS)))
		return fl_tc_account(FL_STAT_PASS_ENCAP_FAILED, len);
	/* The pushed headers are linear, and the inner IPv4 header was before. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	hdr = data;
	inner_ip = (void *)(hdr + 1);
	if ((void *)(inner_ip + 1) > data_end)
		return fl_tc_account(FL_STAT_DROP_WRITE_FAILED, len);

	/* Outer destination MAC zero: bpf_redirect_neigh() fills in both. */
	__builtin_memset(hdr->outer_eth.h_dest, 0, ETH_ALEN);
	__builtin_memcpy(hdr->outer_eth.h_source, cfg->uplink_mac, ETH_ALEN);
	hdr->outer_eth.h_proto = bpf_htons(ETH_P_IP);

	/* version 4, ihl 5: one byte store (two bitfield stores would each read the byte first) */
	*(__u8 *)&hdr->outer_ip = 0x45;
	hdr->outer_ip.tos = fl_outer_tos(inner_tos);
	hdr->outer_ip.tot_len = bpf_htons(outer_l3_len);
	hdr->outer_ip.id = fl_outer_ip_id(encapsulated);
	hdr->outer_ip.frag_off = 0;
	hdr->outer_ip.ttl = FL_OUTER_TTL;
	hdr->outer_ip.protocol = IPPROTO_UDP;
	hdr->outer_ip.check = 0;
	hdr->outer_ip.saddr = cfg->underlay_ip;
	hdr->outer_ip.daddr = peer->underlay_ip;
	hdr->outer_ip.check = fl_ipv4_hdr_csum(&hdr->outer_ip);

	hdr->udp.source = bpf_htons(fl_vxlan_src_port(hash, cfg));
	hdr->udp.dest = bpf_htons(cfg->vxlan_port);
	hdr->udp.len = bpf_htons(outer_l3_len - sizeof(struct iphdr));
	hdr->udp.check = 0;

	hdr->vxlan.flags = bpf_htonl(fl_vxlan_flags(cfg, skb->mark));
	hdr->vxlan.vni = bpf_htonl(cfg->vni << 8);

	__builtin_memcpy(hdr->inner_eth.h_dest, peer->vtep_mac, ETH_ALEN);
	__builtin_memcpy(hdr->inner_eth.h_source, cfg->vtep_mac, ETH_ALEN);
	hdr->inner_eth.h_proto = bpf_htons(ETH_P_IP);

	if (forwarding)
		fl_ipv4_decrease_ttl(inner_ip);
	return fl_count(encapsulated, len, redirect_by_fib(cfg));
}

/* Where route_to_peer() runs: what it may assume of the frame, how it delivers locally. */
enum fl_hook {
	FL_HOOK_BRIDGE_PORT, /* a pod's veth on cni0: route only what is for the gateway MAC */
	FL_HOOK_HOST,        /* flannel.<VNI> egress: routed by the kernel already */
	FL_HOOK_ROUTED_VETH, /* a routed pod's veth (tc ingress) */
	FL_HOOK_NETKIT,      /* a netkit pod's transmit */
};

/*
 * A routed pod's packet for another pod of this node: from the gateway to
 * that pod, TTL - 1, into its namespace. L3 netkit pods have an all-zero MAC;
 * a veth pod's is in the endpoint.
 */
static __always_inline int deliver_locally(struct __sk_buff *skb, const struct fl_local_config *cfg,
					   const struct fl_endpoint *ep, struct ethhdr *eth,
					   struct iphdr *iph, __u32 len, const enum fl_hook hook)
{
	if (iph->ttl <= 1)
		return fl_tc_account(FL_STAT_PASS_TTL_EXCEEDED, len);
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->bridge_mac, ETH_ALEN);
	fl_ipv4_decrease_ttl(iph);
	if (hook == FL_HOOK_NETKIT)
		return fl_account(FL_STAT_LOCAL_TO_POD, len, bpf_redirect(ep->ifindex, 0));
	return fl_account(FL_STAT_LOCAL_TO_POD, len, bpf_redirect_peer(ep->ifindex, 0));
}

static __always_inline int route_to_peer(struct __sk_buff *skb, const enum fl_hook hook)
{
	const int forwarding = hook != FL_HOOK_HOST;
	const int routed_pod = hook == FL_HOOK_ROUTED_VETH || hook == FL_HOOK_NETKIT;
	struct fl_endpoint *ep;
	const __u32 len = skb->len;
	struct fl_local_config *cfg = fl_local_config();
	struct fl_lpm_v4_key key = { .prefixlen = 32 };
	struct fl_peer *peer;
	struct ethhdr *eth;
	struct iphdr *iph;
	void *data, *data_end;
	__u32 stat, limit;

	if (!cfg)
		return fl_tc_account(FL_STAT_PASS_NO_CONFIG, len);
	/* A hardware-accelerated VLAN tag: the frame belongs to a VLAN device. */
	if (skb->vlan_present)
		return fl_tc_account(FL_STAT_PASS_VLAN_TAGGED, len);
	fl_skb_linearize(skb, sizeof(struct ethhdr) + sizeof(struct iphdr));
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	stat = fl_parse_eth_ipv4(data, data_end, len, &eth, &iph);
	if (stat != FL_STAT_NONE)
		return fl_tc_account(stat, len);
	/*
	 * Only what a pod sends to its gateway is routed. At a pod's veth on the
	 * bridge we see every frame it sends: one for another MAC (a local pod
	 * that routes, say) is the bridge's to deliver, as are broadcast and
	 * multicast. On flannel.<VNI> the kernel has routed already and set a
	 * peer's VtepMAC. A routed pod has nobody but its router on the link.
	 */
	if (hook == FL_HOOK_BRIDGE_PORT ? !fl_mac_equal(eth->h_dest, cfg->bridge_mac) :
	    hook == FL_HOOK_HOST && fl_mac_is_multicast(eth->h_dest))
		return fl_tc_account(FL_STAT_PASS_NOT_FOR_GATEWAY, len);
	if (routed_pod) {
		ep = fl_endpoints.lookup(&iph->daddr);
		if (ep)
			return deliver_locally(skb, cfg, ep, eth, iph, len, hook);
	}

	key.addr = iph->daddr;
	peer = fl_peers.lookup(&key);
	/* A lease of our own among the peers would loop packets back to us. */
	if (!peer || (peer->mode != FL_MODE_VXLAN && peer->mode != FL_MODE_DIRECT) ||
	    peer->underlay_ip == cfg->underlay_ip)
		return fl_tc_account(FL_STAT_PASS_NO_ROUTE, len);
	if (forwarding && iph->ttl <= 1)
		return fl_tc_account(FL_STAT_PASS_TTL_EXCEEDED, len);

	/*
	 * Too big for the path: the kernel routes it via flannel.<VNI>, whose MTU
	 * (uplink - 50) makes it send ICMP frag-needed for DF packets and
	 * fragment the rest; the fragments then come back through
	 * tc_encap_from_host. Outer tot_len must also fit 16 bits (BIG TCP).
	 */
	limit = cfg->mtu;
	if (peer->mode == FL_MODE_VXLAN) {
		limit -= FL_VXLAN_OVERHEAD;
		if (len - sizeof(struct ethhdr) + FL_VXLAN_OVERHEAD > 0xffff)
			return fl_tc_account(FL_STAT_PASS_OVERSIZE, len);
	}
	if (l3_len_on_wire(skb, iph) > limit)
		return fl_tc_account(FL_STAT_PASS_OVERSIZE, len);

	if (peer->mode == FL_MODE_DIRECT) {
		if (forwarding)
			fl_ipv4_decrease_ttl(iph);
		return fl_account(FL_STAT_FWD_DIRECT, len, redirect_to_neighbour(cfg, peer->underlay_ip));
	}
	return encap_vxlan(skb, cfg, peer, iph, len, forwarding);
}

FL_PROGRAM(tc_encap_from_pods, struct __sk_buff, skb)
{
	return route_to_peer(skb, FL_HOOK_BRIDGE_PORT);
}

FL_PROGRAM(tc_encap_from_host, struct __sk_buff, skb)
{
	return route_to_peer(skb, FL_HOOK_HOST);
}

FL_PROGRAM(tc_from_routed_pod, struct __sk_buff, skb)
{
	return route_to_peer(skb, FL_HOOK_ROUTED_VETH);
}

/* netkit's verdicts are tc's: NETKIT_PASS 0, DROP 2, REDIRECT 7 (TC_ACT_OK, SHOT, REDIRECT). */
FL_PROGRAM(nk_from_pod, struct __sk_buff, skb)
{
	return route_to_peer(skb, FL_HOOK_NETKIT);
}
