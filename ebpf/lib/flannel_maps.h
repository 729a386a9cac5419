/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ONE description of what the flannel-bpf programs and the agent share:
 * every map's key and value layout, the maps themselves, and the counter ids
 * (verdicts and drop reasons). loader/bpf/layout.py mirrors this file with ctypes;
 * tests/bpf/test_layout.py compiles a probe against it and fails on any drift.
 *
 * Byte order: fields named *_ip / *_addr hold IPv4 addresses in network order
 * (as they sit in packets); every other integer is in host order.
 *
 * Every map is pinned under FL_PIN_DIR (given with -D at load time), so both
 * programs (tc_route.c and vxlan_xdp.c, compiled as separate bcc modules) open
 * the same maps, and a restarted agent finds its state where it left it.
 */
#ifndef FLANNEL_MAPS_H
#define FLANNEL_MAPS_H

#ifndef FL_PIN_DIR
#error "FL_PIN_DIR must be defined (the bpffs directory the maps are pinned in)"
#endif

#ifndef FL_MAX_PEERS
#define FL_MAX_PEERS 65536 /* a /8 network cut into /24 subnets */
#endif
#ifndef FL_MAX_ENDPOINTS
#define FL_MAX_ENDPOINTS 16384
#endif

#define FL_VXLAN_OVERHEAD 50 /* outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 */

/* How a remote subnet is reached. */
enum fl_peer_mode {
	FL_MODE_VXLAN = 1,  /* encapsulate as flannel's vxlan backend does */
	FL_MODE_DIRECT = 2, /* host-gw / DirectRouting: peer on our L2, route unchanged */
};

/* Key of fl_peers: an IPv4 prefix, the layout BPF_MAP_TYPE_LPM_TRIE demands. */
struct fl_lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

/* Value of fl_peers: where a remote flannel subnet lives. */
struct fl_peer {
	__be32 underlay_ip;  /* the peer's PublicIP: outer destination / next hop */
	__u8 vtep_mac[6];    /* the peer's VtepMAC: inner destination MAC */
	__u8 mode;           /* enum fl_peer_mode */
	__u8 pad;
};

/* Value of fl_peer_ips: presence marks a known peer underlay address. */
struct fl_peer_ip {
	__u8 present;
};

/* Value of fl_endpoints: a pod on this node, for delivery past the bridge. */
struct fl_endpoint {
	__u32 ifindex;     /* host-side veth of the pod (bpf_redirect_peer target) */
	__u8 mac[6];       /* the pod's eth0 MAC */
	__u8 pad[2];
};

/* The single entry of fl_config: this node. */
struct fl_local_config {
	__u32 configured;        /* 0 until the agent writes the entry: programs pass everything */
	__be32 underlay_ip;      /* our PublicIP: outer source of encap, destination of decap */
	__be32 subnet_addr;      /* our flannel subnet (shown by status, checked by the agent) */
	__u32 subnet_prefixlen;
	__u32 vni;               /* 24-bit VXLAN network identifier */
	__u16 vxlan_port;        /* outer UDP destination port, 8472 by default */
	__u16 src_port_min;      /* outer UDP source port range, as the kernel vxlan */
	__u16 src_port_max;      /*   device: [min, max) from ip_local_port_range */
	__u16 mtu;               /* uplink MTU; VXLAN payload limit is mtu - 50 */
	__u32 uplink_ifindex;    /* encap redirect target */
	__u32 bridge_ifindex;    /* cni0 (attach point; status only) */
	__u32 vxlan_ifindex;     /* flannel.<VNI> (attach point; status only) */
	__u8 vtep_mac[6];        /* our VtepMAC: inner source MAC of encap */
	__u8 uplink_mac[6];      /* inner destination MAC after XDP decap (else OTHERHOST) */
	__u8 bridge_mac[6];      /* the pods' gateway: what encap routes, source of delivery to pods */
	__u8 gbp;                /* Backend.GBP: the Group Based Policy extension, as the kernel device */
	__u8 pad;
};

/* Value of fl_counters (per CPU): what one counter id has seen. */
struct fl_counter {
	__u64 packets;
	__u64 bytes; /* packet length as the program received it */
};

/*
 * Counter ids, one per outcome; every program run increments exactly one.
 * PASS_* hands the packet to the kernel untouched (TC_ACT_OK / XDP_PASS),
 * DROP_* drops it, the rest are the fast paths. Append only: the pinned
 * counter map of a running node is sized by FL_STAT_MAX.
 */
enum fl_stat {
	/* tc_route.c (encap side) */
	FL_STAT_ENCAP_VXLAN = 0,         /* encapsulated, redirected to the uplink */
	FL_STAT_FWD_DIRECT = 1,          /* routed to a same-L2 peer without encap */
	FL_STAT_PASS_NO_ROUTE = 2,       /* destination is in no remote subnet */
	FL_STAT_PASS_NOT_FOR_GATEWAY = 3, /* not sent to the gateway MAC (or multicast): bridged, not routed */
	FL_STAT_PASS_OVERSIZE = 4,       /* too big for the path: kernel sends frag-needed or fragments */
	FL_STAT_PASS_ENCAP_FAILED = 5,   /* bpf_skb_adjust_room refused; packet untouched */
	/* shared by both sides */
	FL_STAT_PASS_NO_CONFIG = 6,      /* fl_config not written yet */
	FL_STAT_PASS_NOT_IPV4 = 7,       /* ARP, IPv6, ... */
	FL_STAT_PASS_MALFORMED = 8,      /* truncated or inconsistent headers: the kernel judges */
	FL_STAT_PASS_TTL_EXCEEDED = 9,   /* TTL <= 1: the kernel sends ICMP time exceeded */
	FL_STAT_DROP_WRITE_FAILED = 10,  /* header rewrite failed after the packet was resized */
	/* vxlan_xdp.c (decap side) */
	FL_STAT_DECAP_XDP = 11,          /* decapsulated in XDP, passed to the stack */
	FL_STAT_DECAP_TO_POD = 12,       /* decapsulated in tc, redirected into the pod */
	FL_STAT_DIRECT_TO_POD = 13,      /* plain IPv4 from a DIRECT peer, redirected into the pod */
	FL_STAT_PASS_NOT_VXLAN = 14,     /* not UDP to our VXLAN port (tc: nor to a pod of ours), or
					  * a peer's VXLAN not to our address and uplink MAC */
	FL_STAT_PASS_OUTER_IP_OPTIONS = 15, /* a peer's VXLAN with outer IPv4 options */
	FL_STAT_PASS_OUTER_FRAGMENT = 16,   /* a peer's first fragment, or any later UDP fragment */
	FL_STAT_PASS_OUTER_BAD_CSUM = 17,    /* the kernel drops it and counts it */
	FL_STAT_PASS_VXLAN_BAD_FLAGS = 18,   /* I flag missing or reserved bits set */
	FL_STAT_PASS_WRONG_VNI = 19,
	FL_STAT_PASS_INNER_NOT_IPV4 = 20,
	FL_STAT_PASS_NOT_LOCAL_ENDPOINT = 21, /* tc: the kernel vxlan device decaps it */
	FL_STAT_PASS_DECAP_FAILED = 22,       /* bpf_skb_adjust_room refused; untouched */
	/*
	 * UDP to our VXLAN port and address from an address with no lease (any
	 * VNI): the kernel's vxlan socket would take it, so it is dropped here.
	 * The variants below are the same from other paths into that socket.
	 */
	FL_STAT_DROP_UNKNOWN_PEER = 23,
	FL_STAT_PASS_VLAN_TAGGED = 24,        /* 802.1Q/802.1ad: the frame is a VLAN device's */
	FL_STAT_PASS_NOT_TO_UPLINK_MAC = 25,  /* tc: plain IPv4 for a pod of ours, to another MAC */
	FL_STAT_PASS_NOT_FROM_DIRECT_PEER = 26, /* tc: plain IPv4 for a pod of ours, from no DIRECT
						 * peer's subnet: the kernel routes it */
	FL_STAT_DROP_UNKNOWN_PEER_OTHER_MAC = 27,    /* ... in a frame to broadcast, multicast or another MAC */
	FL_STAT_DROP_UNKNOWN_PEER_IP_OPTIONS = 28,   /* ... with outer IPv4 options */
	FL_STAT_DROP_UNKNOWN_PEER_FRAGMENT = 29,     /* ... the first fragment (it carries the port) */
	FL_STAT_DROP_UNKNOWN_PEER_VLAN_TAGGED = 30,  /* ... VLAN-tagged (VID 0, or a VLAN device's) */
	FL_STAT_DROP_UNKNOWN_PEER_OTHER_ADDRESS = 31, /* ... to another local, broadcast or multicast
						       * address of this node */
	/* tc_route.c, routed pods (flannel-bpf-cni) */
	FL_STAT_LOCAL_TO_POD = 32,       /* to another pod of this node, redirected into it */
	FL_STAT_MAX = 33,
};

/*
 * Remote subnets (one per peer lease) -> how to reach them. Longest-prefix
 * match on the inner destination. Written by the agent from etcd leases.
 */
BPF_TABLE_PINNED("lpm_trie", struct fl_lpm_v4_key, struct fl_peer, fl_peers,
		 FL_MAX_PEERS, FL_PIN_DIR "/fl_peers", BPF_F_NO_PREALLOC);

/*
 * Underlay addresses of all known peers. Decap accepts VXLAN only from these
 * (stock flannel accepts any sender that knows the VNI).
 */
BPF_TABLE_PINNED("hash", __be32, struct fl_peer_ip, fl_peer_ips,
		 FL_MAX_PEERS, FL_PIN_DIR "/fl_peer_ips", BPF_F_NO_PREALLOC);

/* This node's settings; key 0. An array so the lookup never misses. */
BPF_TABLE_PINNED("array", __u32, struct fl_local_config, fl_config,
		 1, FL_PIN_DIR "/fl_config");

/*
 * Pods of this node by IPv4 (network order) -> host-side veth and pod MAC, so
 * decapsulated traffic can skip the bridge (bpf_redirect_peer).
 */
BPF_TABLE_PINNED("hash", __be32, struct fl_endpoint, fl_endpoints,
		 FL_MAX_ENDPOINTS, FL_PIN_DIR "/fl_endpoints", BPF_F_NO_PREALLOC);

/* Per-CPU packet and byte counts, indexed by enum fl_stat. */
BPF_TABLE_PINNED("percpu_array", __u32, struct fl_counter, fl_counters,
		 FL_STAT_MAX, FL_PIN_DIR "/fl_counters");

#endif /* FLANNEL_MAPS_H */
