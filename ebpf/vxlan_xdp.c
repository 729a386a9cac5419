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
 * Never drop what is not ours: the only drop is VXLAN for our VNI and port
 * from an address that holds no lease (stock flannel would accept it).
 */
#include "lib/common.h"
#include "lib/pkt_parse.h"
#include "lib/csum.h"
#include "lib/vxlan.h"

#define DECAP_FLAGS (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4)

int xdp_decap(struct xdp_md *ctx)
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
	stat = fl_parse_vxlan(data, data_end, len, cfg, &view);
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
#ifdef FL_BENCH_UNDO_DECAP
	/*
	 * Timing build only: BPF_PROG_TEST_RUN does not restore the packet between
	 * repeats, so put the outer headers (still in the headroom) and the inner
	 * MAC back, making every repeat a full decap.
	 */
	if (bpf_xdp_adjust_head(ctx, -FL_VXLAN_OVERHEAD) == 0) {
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (data + FL_VXLAN_OVERHEAD + sizeof(struct ethhdr) <= data_end)
			__builtin_memcpy(data + FL_VXLAN_OVERHEAD, cfg->vtep_mac, ETH_ALEN);
	}
#endif
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
 * Plain IPv4 from a pod of a DIRECT (host-gw) peer to a pod of ours: the same
 * shortcut into the pod. The source must lie in a DIRECT peer's subnet and
 * the frame be addressed to the uplink; anything else is the kernel's.
 */
static __always_inline int direct_to_pod(struct __sk_buff *skb, const struct fl_local_config *cfg,
					 __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct fl_lpm_v4_key key = { .prefixlen = 32 };
	struct fl_endpoint *ep;
	struct fl_peer *peer;
	struct ethhdr *eth;
	struct iphdr *iph;

	if (fl_parse_eth_ipv4(data, data_end, len, &eth, &iph) != FL_STAT_NONE ||
	    !fl_mac_equal(eth->h_dest, cfg->uplink_mac))
		return fl_tc_account(FL_STAT_PASS_NOT_VXLAN, len);
	ep = fl_endpoints.lookup(&iph->daddr);
	if (!ep)
		return fl_tc_account(FL_STAT_PASS_NOT_VXLAN, len);
	key.addr = iph->saddr;
	peer = fl_peers.lookup(&key);
	if (!peer || peer->mode != FL_MODE_DIRECT)
		return fl_tc_account(FL_STAT_PASS_NOT_VXLAN, len);
	if (iph->ttl <= 1)
		return fl_tc_account(FL_STAT_PASS_TTL_EXCEEDED, len);
	return deliver_to_pod(skb, cfg, ep, len, FL_STAT_DIRECT_TO_POD);
}

int tc_decap(struct __sk_buff *skb)
{
	const __u32 len = skb->len;
	struct fl_local_config *cfg = fl_local_config();
	struct fl_vxlan_view view;
	__u32 stat;

	if (!cfg)
		return fl_tc_account(FL_STAT_PASS_NO_CONFIG, len);
	if (skb->vlan_present)
		return fl_tc_account(FL_STAT_PASS_NOT_IPV4, len);
	fl_skb_linearize(skb, FL_VXLAN_MIN_LEN);
	stat = fl_parse_vxlan((void *)(long)skb->data, (void *)(long)skb->data_end, len, cfg, &view);
	if (stat == FL_STAT_NONE)
		return decap_to_pod(skb, cfg, &view, len);
	if (stat == FL_STAT_PASS_NOT_VXLAN)
		return direct_to_pod(skb, cfg, len);
	return fl_tc_account(stat, len);
}
