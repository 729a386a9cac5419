/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What bcc 0.26's built-in headers lack or get wrong for this kernel (6.18),
 * in one place so the programs read like plain kernel BPF.
 */
#ifndef FL_COMPAT_H
#define FL_COMPAT_H

#include <uapi/linux/bpf.h>

/* Not in bcc 0.26's copy of uapi/linux/bpf.h (added in Linux 6.3). */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

/*
 * bcc 0.26 declares bpf_redirect_neigh() with the 3-argument prototype of its
 * first draft; the kernel helper takes (ifindex, params, plen, flags). Calling
 * bcc's would pass flags as plen, so declare the real one under our own name.
 */
static long (*fl_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params,
				 int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#ifndef AF_INET
#define AF_INET 2
#endif

#endif /* FL_COMPAT_H */
