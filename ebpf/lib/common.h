/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What every program starts from: the maps, this node's config, and the
 * accounting. Every program run ends in exactly one fl_account() call, one
 * counter per outcome, so the counted packets add up to the number of runs
 * (the fuzz tests check exactly that).
 */
#ifndef FL_COMMON_H
#define FL_COMMON_H

#include <uapi/linux/pkt_cls.h>
#include "compat.h"
#include "flannel_maps.h"
#include "timing.h"

/* "Not decided yet": returned by parsers when the packet goes on. */
#define FL_STAT_NONE FL_STAT_MAX

/* The counter slot of one outcome, for a program that uses it before it ends. */
static __always_inline struct fl_counter *fl_counter_of(__u32 stat)
{
	return fl_counters.lookup(&stat);
}

static __always_inline int fl_count(struct fl_counter *counter, __u32 len, int action)
{
	/* Per-CPU slot: no atomics needed, a program never migrates mid-run. */
	if (counter) {
		counter->packets += 1;
		counter->bytes += len;
	}
	return action;
}

static __always_inline int fl_account(__u32 stat, __u32 len, int action)
{
	return fl_count(fl_counter_of(stat), len, action);
}

static __always_inline int fl_stat_is_drop(__u32 stat)
{
	return stat == FL_STAT_DROP_WRITE_FAILED || stat == FL_STAT_DROP_UNKNOWN_PEER ||
	       (stat >= FL_STAT_DROP_UNKNOWN_PEER_OTHER_MAC && stat <= FL_STAT_DROP_UNKNOWN_PEER_OTHER_ADDRESS);
}

/* For the PASS_* and DROP_* outcomes: what a tc program returns for them. */
static __always_inline int fl_tc_account(__u32 stat, __u32 len)
{
	return fl_account(stat, len, fl_stat_is_drop(stat) ? TC_ACT_SHOT : TC_ACT_OK);
}

static __always_inline int fl_xdp_account(__u32 stat, __u32 len)
{
	return fl_account(stat, len, fl_stat_is_drop(stat) ? XDP_DROP : XDP_PASS);
}

static __always_inline struct fl_local_config *fl_local_config(void)
{
	__u32 zero = 0;
	struct fl_local_config *cfg = fl_config.lookup(&zero);

	return (cfg && cfg->configured) ? cfg : NULL;
}

#endif /* FL_COMMON_H */
