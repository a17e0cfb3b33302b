// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * netboot socket load balancer (IPv4): ClusterIP translation at the socket
 * layer, after Cilium's bpf_sock.c.
 *
 *   connect4     TCP and connected UDP: VIP:port -> backend:port
 *   sendmsg4     unconnected UDP:       VIP:port -> backend:port
 *   recvmsg4     UDP replies:           backend:port -> VIP:port (source seen by the app)
 *   getpeername4 any translated socket: backend:port -> VIP:port
 *
 * Entry points are thin: each calls one __nb_* helper that returns an outcome
 * (enum nb_counter), counts it, and decides the verdict. Only a service with
 * no usable backend (or a full reverse map) rejects the syscall, with
 * ECONNREFUSED (ENOMEM) set through bpf_set_retval, the way Cilium's socket LB
 * rejects with SYS_REJECT + try_set_retval(). Everything else proceeds.
 *
 * IPv6 is not implemented: connect6/sendmsg6/... are not attached, so IPv6
 * sockets are never translated (single-stack IPv4 Service CIDR).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_SERVICES);
	__type(key, struct nb_lb4_key);
	__type(value, struct nb_lb4_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_BACKENDS);
	__type(key, __u32);
	__type(value, struct nb_lb4_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_REVNAT);
	__type(key, __u16);
	__type(value, struct nb_lb4_reverse_nat);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_REV_SK);
	__type(key, struct nb_lb4_rev_sk_key);
	__type(value, struct nb_lb4_rev_sk_val);
} nb_lb4_rev_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_AFFINITY);
	__type(key, struct nb_lb4_affinity_key);
	__type(value, struct nb_lb4_affinity_val);
} nb_lb4_aff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_BACKENDS);
	__type(key, struct nb_lb4_affinity_match);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_affmatch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NB_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} nb_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nb_config);
} nb_config SEC(".maps");

static __always_inline void nb_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&nb_counters, &idx);

	if (v)
		*v += 1;
}

/* Narrow ctx access is not allowed on user_port: read the full word. */
static __always_inline __be16 ctx_dport(const struct bpf_sock_addr *ctx)
{
	volatile __u32 dport = ctx->user_port;

	return (__be16)dport;
}

static __always_inline void nb_set_key(struct nb_lb4_key *key, __be32 addr,
				       __be16 port, __u8 proto, __u16 slot)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->address = addr;
	key->dport = port;
	key->proto = proto;
	key->backend_slot = slot;
}

/* Result of a forward translation attempt. */
struct nb_fwd {
	__u32 outcome;   /* enum nb_counter */
	int reject_errno;/* 0 = proceed; else errno the syscall fails with */
};

/* Backend id from a valid affinity entry, 0 if none (outcome counted). */
static __always_inline __u32
nb_affinity_lookup(const struct nb_lb4_service *svc, __u64 client, __u16 rev_nat_id)
{
	struct nb_lb4_affinity_key akey;
	struct nb_lb4_affinity_match mkey;
	struct nb_lb4_affinity_val *aval;
	__u64 now, timeout_ns;
	__u32 backend_id;

	__builtin_memset(&akey, 0, sizeof(akey));
	akey.client_cookie = client;
	akey.rev_nat_id = rev_nat_id;

	aval = bpf_map_lookup_elem(&nb_lb4_aff, &akey);
	if (!aval)
		return 0;

	now = bpf_ktime_get_ns();
	timeout_ns = (__u64)svc->affinity_timeout * 1000000000ULL;
	if (now - aval->last_used > timeout_ns) {
		nb_count(NB_CTR_AFFINITY_EXPIRED);
		bpf_map_delete_elem(&nb_lb4_aff, &akey);
		return 0;
	}

	backend_id = aval->backend_id;
	__builtin_memset(&mkey, 0, sizeof(mkey));
	mkey.backend_id = backend_id;
	mkey.rev_nat_id = rev_nat_id;
	if (!bpf_map_lookup_elem(&nb_lb4_affmatch, &mkey)) {
		nb_count(NB_CTR_AFFINITY_STALE);
		bpf_map_delete_elem(&nb_lb4_aff, &akey);
		return 0;
	}

	aval->last_used = now;
	return backend_id;
}

static __always_inline void
nb_affinity_update(__u64 client, __u16 rev_nat_id, __u32 backend_id)
{
	struct nb_lb4_affinity_key akey;
	struct nb_lb4_affinity_val aval;

	__builtin_memset(&akey, 0, sizeof(akey));
	__builtin_memset(&aval, 0, sizeof(aval));
	akey.client_cookie = client;
	akey.rev_nat_id = rev_nat_id;
	aval.last_used = bpf_ktime_get_ns();
	aval.backend_id = backend_id;
	bpf_map_update_elem(&nb_lb4_aff, &akey, &aval, BPF_ANY);
}

static __always_inline int
nb_rev_sk_update(struct bpf_sock_addr *ctx, const struct nb_lb4_backend *be,
		 __be32 vip, __be16 vport, __u16 rev_nat_id)
{
	struct nb_lb4_rev_sk_key key;
	struct nb_lb4_rev_sk_val val, *cur;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&val, 0, sizeof(val));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address = be->address;
	key.port = be->port;
	val.address = vip;
	val.port = vport;
	val.rev_nat_index = rev_nat_id;

	cur = bpf_map_lookup_elem(&nb_lb4_rev_sk, &key);
	if (cur && cur->address == val.address && cur->port == val.port &&
	    cur->rev_nat_index == val.rev_nat_index)
		return 0;
	return bpf_map_update_elem(&nb_lb4_rev_sk, &key, &val, BPF_ANY);
}

static __always_inline struct nb_fwd __nb_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct nb_fwd res = { .outcome = NB_CTR_NOT_SERVICE, .reject_errno = 0 };
	const __u32 zero = 0;
	struct nb_config *cfg;
	struct nb_lb4_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb4_backend *be = 0;
	__u32 proto = ctx->protocol;
	__be32 vip = ctx->user_ip4;
	__be16 vport = ctx_dport(ctx);
	__u32 backend_id = 0;
	__u64 client = 0;
	__u16 rev_nat_id;
	int affinity;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		res.outcome = NB_CTR_PROTO_UNSUPPORTED;
		return res;
	}

	nb_set_key(&key, vip, vport, (__u8)proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &key);
	if (!svc)
		return res;

	cfg = bpf_map_lookup_elem(&nb_config, &zero);
	if (!cfg) {
		res.outcome = NB_CTR_NO_CONFIG;
		return res;
	}
	if (cfg->mode != NB_MODE_REPLACE) {
		res.outcome = NB_CTR_OBSERVED;
		return res;
	}

	rev_nat_id = svc->rev_nat_index;
	affinity = svc->flags & NB_SVC_F_AFFINITY;

	if (affinity) {
		client = bpf_get_netns_cookie(ctx);
		backend_id = nb_affinity_lookup(svc, client, rev_nat_id);
		if (backend_id) {
			be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
			if (be)
				nb_count(NB_CTR_AFFINITY_HIT);
			else
				backend_id = 0;
		}
	}

	if (!backend_id) {
		__u32 sel;

		if (svc->count == 0) {
			res.outcome = NB_CTR_NO_BACKEND;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		/* TCP: random; UDP: per socket, so a socket keeps its backend. */
		if (proto == IPPROTO_TCP)
			sel = bpf_get_prandom_u32();
		else
			sel = (__u32)bpf_get_socket_cookie(ctx);
		key.backend_slot = (__u16)((sel % svc->count) + 1);
		slot = bpf_map_lookup_elem(&nb_lb4_svc, &key);
		if (!slot) {
			res.outcome = NB_CTR_NO_BACKEND_SLOT;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		backend_id = slot->backend_id;
		be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
		if (!be) {
			res.outcome = NB_CTR_BACKEND_MISSING;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		if (affinity) {
			nb_affinity_update(client, rev_nat_id, backend_id);
			nb_count(NB_CTR_AFFINITY_NEW);
		}
	}
	if (!be)
		return res;

	if (nb_rev_sk_update(ctx, be, vip, vport, rev_nat_id) < 0) {
		res.outcome = NB_CTR_REV_SK_UPDATE_FAIL;
		res.reject_errno = ENOMEM;
		return res;
	}

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	res.outcome = NB_CTR_CONNECT_XLATED;
	return res;
}

static __always_inline int nb_fwd_verdict(struct nb_fwd res, __u32 xlated_ctr)
{
	if (res.outcome == NB_CTR_CONNECT_XLATED)
		res.outcome = xlated_ctr;
	nb_count(res.outcome);
	if (res.reject_errno) {
		bpf_set_retval(-res.reject_errno);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int nb_sock4_connect(struct bpf_sock_addr *ctx)
{
	return nb_fwd_verdict(__nb_xlate_fwd(ctx), NB_CTR_CONNECT_XLATED);
}

SEC("cgroup/sendmsg4")
int nb_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return nb_fwd_verdict(__nb_xlate_fwd(ctx), NB_CTR_SENDMSG_XLATED);
}

/* Reverse translation: backend -> VIP for the app's view. Returns outcome. */
static __always_inline __u32 __nb_xlate_rev(struct bpf_sock_addr *ctx,
					    __u32 xlated, __u32 no_entry)
{
	struct nb_lb4_rev_sk_key key;
	struct nb_lb4_rev_sk_val *val;
	struct nb_lb4_key skey;
	struct nb_lb4_service *svc;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address = ctx->user_ip4;
	key.port = ctx_dport(ctx);

	val = bpf_map_lookup_elem(&nb_lb4_rev_sk, &key);
	if (!val)
		return no_entry;

	nb_set_key(&skey, val->address, val->port, (__u8)ctx->protocol, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &skey);
	if (!svc || svc->rev_nat_index != val->rev_nat_index) {
		bpf_map_delete_elem(&nb_lb4_rev_sk, &key);
		return NB_CTR_REV_STALE;
	}

	ctx->user_ip4 = val->address;
	ctx->user_port = (__u32)val->port;
	return xlated;
}

SEC("cgroup/recvmsg4")
int nb_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	nb_count(__nb_xlate_rev(ctx, NB_CTR_RECVMSG_XLATED, NB_CTR_RECVMSG_NO_ENTRY));
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int nb_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	nb_count(__nb_xlate_rev(ctx, NB_CTR_PEER_XLATED, NB_CTR_PEER_NO_ENTRY));
	return SYS_PROCEED;
}

char _license[] SEC("license") = "Dual BSD/GPL";
