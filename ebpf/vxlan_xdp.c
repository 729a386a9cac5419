/* SPDX-License-Identifier: Apache-2.0 */
/*
 * flannel-bpf, receiving side, on the uplink: VXLAN from a known peer with our
 * VNI and port is decapsulated here instead of by the kernel vxlan device.
 *
 *   xdp_decap  XDP: strip the outer 50 bytes and pass the inner packet up the
 *              stack, which routes it to the pod. The right hook on real NICs;
 *              on a veth it costs the peer its TSO (docs/performance.md).
 *   tc_decap   tc ingress: for a pod of this node, strip the outer headers and
 *              hand the packet straight to the pod (bpf_redirect_peer), past
 *              the bridge; anything else is left to the kernel vxlan device.
 *
 * Never drop what is not ours: the only drops are UDP to our VXLAN port,
 * addressed to this node, from an address that holds no lease (stock flannel
 * would accept it), whichever way it is framed (see check_sender()).
 */
#include "lib/common.h"
#include "lib/pkt_parse.h"
#include "lib/csum.h"
#include "lib/vxlan.h"

#define DECAP_FLAGS (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
#define FL_IP_LIMITED_BROADCAST 0xffffffffU

/*
 * Would the kernel deliver a packet to this destination locally, where its
 * vxlan socket (bound to every address of the node) takes it? Our underlay
 * address, multicast and broadcast; any other address asks the FIB, whose
 * "not forwarded" covers local and broadcast routes (and destinations the
 * kernel would drop anyway). Only the rare non-peer packet gets this far.
 */
static __always_inline int addressed_to_us(void *ctx, const struct fl_local_config *cfg, const struct iphdr *iph)
{
	struct bpf_fib_lookup fib = {};
	__u32 daddr = bpf_ntohl(iph->daddr);
	long ret;

	if (iph->daddr == cfg->underlay_ip || (daddr & 0xf0000000U) == 0xe0000000U ||
	    daddr == FL_IP_LIMITED_BROADCAST)
		return 1;
	fib.family = AF_INET;
	fib.l4_protocol = iph->protocol;
	fib.tot_len = bpf_ntohs(iph->tot_len);
	fib.ipv4_src = iph->saddr;
	fib.ipv4_dst = iph->daddr;
	fib.ifindex = cfg->uplink_ifindex;
	ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	return ret == BPF_FIB_LKUP_RET_NOT_FWDED || ret == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

/*
 * Anti-spoofing, for UDP to our VXLAN port: FL_STAT_NONE when the sender holds
 * a lease. Otherwise a drop reason when the packet is addressed to this node
 * (the kernel's vxlan socket would take it, and flannel.<VNI> accepts VXLAN
 * from anyone), named after the path it tried: a first fragment (a later one
 * cannot be told apart, and never reassembles without it), IP options, a
 * VLAN tag, a broadcast, multicast or foreign MAC, another local address.
 * VXLAN only passing through this node is not ours: PASS_NOT_VXLAN.
 */
static __always_inline __u32 check_sender(void *ctx, const struct fl_local_config *cfg,
					  const struct fl_vxlan_view *view, int tagged)
{
	const struct iphdr *iph = view->outer_ip;

	if (fl_peer_ips.lookup((__be32 *)&iph->saddr))
		return FL_STAT_NONE;
	if (!addressed_to_us(ctx, cfg, iph))
		return FL_STAT_PASS_NOT_VXLAN;
	if (iph->frag_off & bpf_htons(FL_IP_MF | FL_IP_OFFSET))
		return FL_STAT_DROP_UNKNOWN_PEER_FRAGMENT;
	if (iph->ihl != 5)
		return FL_STAT_DROP_UNKNOWN_PEER_IP_OPTIONS;
	if (tagged)
		return FL_STAT_DROP_UNKNOWN_PEER_VLAN_TAGGED;
	if (!fl_mac_equal(view->outer_eth->h_dest, cfg->uplink_mac))
		return FL_STAT_DROP_UNKNOWN_PEER_OTHER_MAC;
	if (iph->daddr != cfg->underlay_ip)
		return FL_STAT_DROP_UNKNOWN_PEER_OTHER_ADDRESS;
	return FL_STAT_DROP_UNKNOWN_PEER;
}

/*
 * Both hooks: VXLAN from a peer that this node decapsulates itself
 * (FL_STAT_NONE, inner headers in *view), or the outcome for everything else.
 */
static __always_inline __u32 classify(void *ctx, void *data, void *data_end, __u32 len,
				      const struct fl_local_config *cfg, struct fl_vxlan_view *view,
				      int hw_tagged)
{
	__u32 stat = fl_parse_udp_to_port(data, data_end, len, cfg->vxlan_port, view);
	int tagged = hw_tagged || view->tagged;

	if (stat != FL_STAT_NONE)
		return hw_tagged ? FL_STAT_PASS_VLAN_TAGGED : stat;
	stat = check_sender(ctx, cfg, view, tagged);
	if (stat != FL_STAT_NONE)
		return stat;
	if (tagged) /* a peer's, but the frame is a VLAN device's */
		return FL_STAT_PASS_VLAN_TAGGED;
	return fl_parse_vxlan(data_end, cfg, view);
}

FL_PROGRAM(xdp_decap, struct xdp_md, ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	const __u32 len = data_end - data;
	struct fl_local_config *cfg = fl_local_config();
	struct fl_vxlan_view view;
	struct ethhdr *eth;
	__u32 stat;

	if (!cfg)
		return fl_xdp_account(FL_STAT_PASS_NO_CONFIG, len);
	stat = classify(ctx, data, data_end, len, cfg, &view, 0);
	if (stat != FL_STAT_NONE)
		return fl_xdp_account(stat, len);

	if (bpf_xdp_adjust_head(ctx, FL_VXLAN_OVERHEAD))
		return fl_xdp_account(FL_STAT_PASS_DECAP_FAILED, len);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end) /* cannot happen: parsed above */
		return fl_xdp_account(FL_STAT_DROP_WRITE_FAILED, len);
	/*
	 * The inner frame is addressed to our VtepMAC, which is not the uplink's:
	 * eth_type_trans() would mark it PACKET_OTHERHOST and ip_rcv() drop it.
	 */
	__builtin_memcpy(eth->h_dest, cfg->uplink_mac, ETH_ALEN);
	return fl_account(FL_STAT_DECAP_XDP, len, XDP_PASS);
}

/*
 * After the packet is an Ethernet + IPv4 frame for a local pod: address it
 * from the gateway to the pod, do the router's TTL - 1, and hand it to the
 * pod's network namespace directly.
 */
static __always_inline int deliver_to_pod(struct __sk_buff *skb, const struct fl_local_config *cfg,
					  const struct fl_endpoint *ep, __u32 len, __u32 stat)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);

	if ((void *)(iph + 1) > data_end) /* cannot happen: parsed before */
		return fl_tc_account(FL_STAT_DROP_WRITE_FAILED, len);
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->bridge_mac, ETH_ALEN);
	fl_ipv4_decrease_ttl(iph);
	return fl_account(stat, len, bpf_redirect_peer(ep->ifindex, 0));
}

static __always_inline int decap_to_pod(struct __sk_buff *skb, const struct fl_local_config *cfg,
					const struct fl_vxlan_view *view, __u32 len)
{
	struct fl_endpoint *ep = fl_endpoints.lookup(&view->inner_ip->daddr);

	if (!ep)
		return fl_tc_account(FL_STAT_PASS_NOT_LOCAL_ENDPOINT, len);
	if (view->inner_ip->ttl <= 1)
		return fl_tc_account(FL_STAT_PASS_TTL_EXCEEDED, len);
	/*
	 * Removes outer IPv4 + UDP + VXLAN + inner Ethernet right after the outer
	 * Ethernet header, which we then reuse. FIXED_GSO: a GRO-merged packet
	 * already carries the inner segment size.
	 */
	if (bpf_skb_adjust_room(skb, -FL_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, DECAP_FLAGS))
		return fl_tc_account(FL_STAT_PASS_DECAP_FAILED, len);
	return deliver_to_pod(skb, cfg, ep, len, FL_STAT_DECAP_TO_POD);
}

/*
 * Plain IPv4 (parsed into view->outer_*) from a pod of a DIRECT (host-gw)
 * peer to a pod of ours: the same shortcut into the pod. The frame must be
 * addressed to the uplink and the source lie in a DIRECT peer's subnet;
 * anything else is the kernel's, counted by why.
 */
static __always_inline int direct_to_pod(struct __sk_buff *skb, const struct fl_local_config *cfg,
					 const struct fl_vxlan_view *view, __u32 len)
{
	struct fl_lpm_v4_key key = { .prefixlen = 32 };
	struct iphdr *iph = view->outer_ip;
	struct fl_endpoint *ep;
	struct fl_peer *peer;

	ep = fl_endpoints.lookup(&iph->daddr);
	if (!ep) /* traffic for the node itself */
		return fl_tc_account(FL_STAT_PASS_NOT_VXLAN, len);
	if (!fl_mac_equal(view->outer_eth->h_dest, cfg->uplink_mac))
		return fl_tc_account(FL_STAT_PASS_NOT_TO_UPLINK_MAC, len);
	key.addr = iph->saddr;
	peer = fl_peers.lookup(&key);
	if (!peer || peer->mode != FL_MODE_DIRECT)
		return fl_tc_account(FL_STAT_PASS_NOT_FROM_DIRECT_PEER, len);
	if (iph->ttl <= 1)
		return fl_tc_account(FL_STAT_PASS_TTL_EXCEEDED, len);
	return deliver_to_pod(skb, cfg, ep, len, FL_STAT_DIRECT_TO_POD);
}

FL_PROGRAM(tc_decap, struct __sk_buff, skb)
{
	const __u32 len = skb->len;
	struct fl_local_config *cfg = fl_local_config();
	struct fl_vxlan_view view;
	void *data, *data_end;
	__u32 stat;

	if (!cfg)
		return fl_tc_account(FL_STAT_PASS_NO_CONFIG, len);
	/* Room for a VLAN tag and outer IPv4 options before the UDP header. */
	fl_skb_linearize(skb, FL_VXLAN_MIN_LEN + sizeof(struct fl_vlan_hdr) + 40);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	/* A hardware-accelerated VLAN tag sits in skb metadata, not in the data. */
	stat = classify(skb, data, data_end, len, cfg, &view, skb->vlan_present);
	if (stat == FL_STAT_NONE)
		return decap_to_pod(skb, cfg, &view, len);
	if (stat == FL_STAT_PASS_NOT_VXLAN && !view.tagged)
		return direct_to_pod(skb, cfg, &view, len);
	return fl_tc_account(stat, len);
}
