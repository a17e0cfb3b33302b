// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * netboot socket load balancer: ClusterIP translation at the socket layer,
 * after Cilium's bpf_sock.c.
 *
 *   connect4/6     TCP and connected UDP: VIP:port -> backend:port
 *   sendmsg4/6     unconnected UDP:       VIP:port -> backend:port
 *   recvmsg4/6     UDP replies:           backend:port -> VIP:port (source seen by the app)
 *   getpeername4/6 any translated socket: backend:port -> VIP:port
 *
 * The *6 hooks serve two kinds of destination on AF_INET6 sockets:
 * IPv4-mapped (::ffff:a.b.c.d, what the JVM and many runtimes use for IPv4)
 * with exactly the v4 logic against the v4 maps, the backend written back
 * v4-mapped; and IPv6 ClusterIPs against the lb6 maps (see lb.h).
 *
 * Entry points are thin: each calls one __nb_* helper that returns an outcome
 * (enum nb_counter), counts it, and decides the verdict. Only a service with
 * no usable backend (or a full reverse map) rejects the syscall, with
 * ECONNREFUSED (ENOMEM) set through bpf_set_retval, the way Cilium's socket LB
 * rejects with SYS_REJECT + try_set_retval(). Everything else proceeds.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb.h"

#define SYS_REJECT  0
#define SYS_PROCEED 1

/* nb_lb4_svc, nb_lb4_be and nb_lb4_revnat are preallocated (decision,
 * 2026-12-06): a cold start writes every Service into them at once (220,000
 * inserts at 10k Services x 10 endpoints), and an insert into a
 * BPF_F_NO_PREALLOC map allocates its element and charges the memory cgroup:
 * ~1.1 us each on 6.18 against ~0.55 us preallocated, and two writer threads
 * do not speed up the former (they contend in the allocator) but halve the
 * latter. The price is their full size in kernel memory from creation (88 B
 * per nb_lb4_svc entry, 64 B per nb_lb4_be and nb_lb4_revnat entry:
 * netboot_contract::memory), which the DaemonSet's limit already counted;
 * its request now counts it too. A full map holds the same: a failed insert
 * is E2BIG either way. Elements are reused at once after a delete in both
 * kinds (the kernel's per-CPU element caches), so readers see the same. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_SERVICES);
	__type(key, struct nb_lb4_key);
	__type(value, struct nb_lb4_service);
} nb_lb4_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_BACKENDS);
	__type(key, __u32);
	__type(value, struct nb_lb4_backend);
} nb_lb4_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_REVNAT);
	__type(key, __u32);
	__type(value, struct nb_lb4_reverse_nat);
} nb_lb4_revnat SEC(".maps");

/* nb_lb4_rev_sk and nb_lb6_rev_sk, shared with sock_term.bpf.c. */
#include "rev_sk.h"

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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_SERVICES);
	__type(key, struct nb_lb6_key);
	__type(value, struct nb_lb4_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb6_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_BACKENDS);
	__type(key, __u32);
	__type(value, struct nb_lb6_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb6_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_REVNAT);
	__type(key, __u32);
	__type(value, struct nb_lb6_reverse_nat);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb6_revnat SEC(".maps");

/* Flow events (lb.h, "Service flow events"). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, NB_FLOW_RING_BYTES);
} nb_flow_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nb_flow_cfg);
} nb_flow_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nb_flow_bucket);
} nb_flow_rl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NB_FLOW_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} nb_flow_stats SEC(".maps");

/* Per-Service counters (lb.h, "Per-Service counters"). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, NB_DEFAULT_REVNAT);
	__type(key, __u32);
	__type(value, struct nb_svc_stats);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_svc_stats SEC(".maps");

/* TCP sockets' reverse entries (struct nb_rev_tcp, NB_REV_TCP_SLOTS slots,
 * not in mapSizes). This object's only: sock_term's UDP sockets are in the
 * LRU maps. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NB_REV_TCP_SLOTS);
	__type(key, __u32);
	__type(value, struct nb_rev_tcp);
} nb_rev_tcp SEC(".maps");

static __always_inline void nb_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&nb_counters, &idx);

	if (v)
		*v += 1;
}

/* Which field of struct nb_svc_stats nb_svc_count() adds to. */
enum nb_svc_stat {
	NB_SVC_XLATED,
	NB_SVC_REFUSED,
	NB_SVC_AFFINITY,
	NB_SVC_TC_NEW,
	NB_SVC_TC_DROPPED,
};

static __always_inline void nb_svc_stat_add(struct nb_svc_stats *s, enum nb_svc_stat f)
{
	switch (f) {
	case NB_SVC_XLATED:
		s->xlated += 1;
		break;
	case NB_SVC_REFUSED:
		s->refused += 1;
		break;
	case NB_SVC_AFFINITY:
		s->affinity += 1;
		break;
	case NB_SVC_TC_NEW:
		s->tc_new += 1;
		break;
	case NB_SVC_TC_DROPPED:
		s->tc_dropped += 1;
		break;
	}
}

/* Counts one event of service `id` on this CPU. Best effort: a failed
 * insert (map full, no memory) loses the count, never the connection. */
static __always_inline void nb_svc_count(__u32 id, enum nb_svc_stat f)
{
	struct nb_svc_stats *s, init;

	if (!id)
		return;
	s = bpf_map_lookup_elem(&nb_svc_stats, &id);
	if (s) {
		nb_svc_stat_add(s, f);
		return;
	}
	__builtin_memset(&init, 0, sizeof(init));
	nb_svc_stat_add(&init, f);
	/* Another CPU may create it first: then count into ours. */
	if (bpf_map_update_elem(&nb_svc_stats, &id, &init, BPF_NOEXIST) == 0)
		return;
	s = bpf_map_lookup_elem(&nb_svc_stats, &id);
	if (s)
		nb_svc_stat_add(s, f);
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
	/* What a flow event reports (svc_found: the destination is a Service). */
	__u32 backend_id;    /* chosen backend, 0 = none */
	__u32 svc_id;        /* rev-nat id */
	__u8 svc_found;
	__u8 affinity_hit;   /* the backend came from an affinity entry */
	__be32 vip[4];       /* IPv4 in vip[0] */
	__be32 backend[4];   /* IPv4 in backend[0] */
	__be16 vport;
	__be16 backend_port;
	__u8 proto;
	__u8 family;         /* 4 or 6 */
};

/* Records the frontend a decision is about (flow events). */
static __always_inline void nb_fwd_frontend(struct nb_fwd *res, const struct nb_lb4_service *svc,
					    const __be32 *vip, __u8 family, __be16 vport,
					    __u32 proto)
{
	res->svc_found = 1;
	res->svc_id = svc->rev_nat_index;
	res->vip[0] = vip[0];
	if (family == 6) {
		res->vip[1] = vip[1];
		res->vip[2] = vip[2];
		res->vip[3] = vip[3];
	}
	res->vport = vport;
	res->proto = (__u8)proto;
	res->family = family;
}

/* Backend id from a valid affinity entry, 0 if none (outcome counted). */
static __always_inline __u32
nb_affinity_lookup(const struct nb_lb4_service *svc, __u64 client, __u32 rev_nat_id)
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
nb_affinity_update(__u64 client, __u32 rev_nat_id, __u32 backend_id)
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

/* An IPv4 address and port, as the v4 core sees them. */
struct nb_l4_v4 {
	__be32 addr;
	__be16 port;
};

#define nb_compiler_barrier() asm volatile("" ::: "memory")

/* The slot of a TCP socket's reverse entry. */
static __always_inline struct nb_rev_tcp *nb_rev_tcp_slot(__u64 cookie)
{
	__u32 idx = (__u32)cookie & (NB_REV_TCP_SLOTS - 1);

	return bpf_map_lookup_elem(&nb_rev_tcp, &idx);
}

/* Writes a TCP socket's reverse entry; `family` 4: word 0 of each address.
 * The cookie is cleared first and set last, and the reader checks it before
 * and after copying the entry: a socket on another CPU writing the same
 * slot at the same moment (its cookie a multiple of the slot count away)
 * makes the reader find no entry rather than a torn one (stores are seen in
 * order on x86; elsewhere the reader's check of the backend against the
 * socket's real peer remains). */
static __always_inline int nb_rev_tcp_put(__u64 cookie, __u8 family, const __be32 *backend,
					  __be16 backend_port, const __be32 *vip, __be16 vport,
					  __u32 rev_nat_id)
{
	struct nb_rev_tcp *r = nb_rev_tcp_slot(cookie);

	if (!r)
		return -1;
	*(volatile __u64 *)&r->cookie = 0;
	nb_compiler_barrier();
	r->backend[0] = backend[0];
	r->vip[0] = vip[0];
	if (family == 6) {
		r->backend[1] = backend[1];
		r->backend[2] = backend[2];
		r->backend[3] = backend[3];
		r->vip[1] = vip[1];
		r->vip[2] = vip[2];
		r->vip[3] = vip[3];
	} else {
		r->backend[1] = 0;
		r->backend[2] = 0;
		r->backend[3] = 0;
		r->vip[1] = 0;
		r->vip[2] = 0;
		r->vip[3] = 0;
	}
	r->backend_port = backend_port;
	r->vport = vport;
	r->rev_nat_tag = (__u16)rev_nat_id;
	r->family = family;
	r->pad = 0;
	nb_compiler_barrier();
	*(volatile __u64 *)&r->cookie = cookie;
	return 0;
}

/* A TCP socket's reverse entry into *out, if its slot still holds it for
 * the peer backend:port (1), else 0. */
static __always_inline int nb_rev_tcp_get(__u64 cookie, __u8 family, const __be32 *backend,
					  __be16 port, struct nb_rev_tcp *out)
{
	struct nb_rev_tcp *r = nb_rev_tcp_slot(cookie);

	if (!r || *(volatile __u64 *)&r->cookie != cookie)
		return 0;
	nb_compiler_barrier();
	__builtin_memcpy(out, r, sizeof(*out));
	nb_compiler_barrier();
	if (*(volatile __u64 *)&r->cookie != cookie)
		return 0;
	if (out->family != family || out->backend_port != port || out->backend[0] != backend[0])
		return 0;
	if (family == 6 && (out->backend[1] != backend[1] || out->backend[2] != backend[2] ||
			    out->backend[3] != backend[3]))
		return 0;
	return 1;
}

/* The reverse entry of a translated socket: TCP in nb_rev_tcp, UDP (a
 * socket may send to several Services) in the LRU map. */
static __always_inline int
nb_rev_sk_update(__u64 cookie, __u32 proto, const struct nb_lb4_backend *be, __be32 vip,
		 __be16 vport, __u32 rev_nat_id)
{
	struct nb_lb4_rev_sk_key key;
	struct nb_lb4_rev_sk_val val, *cur;

	if (proto == IPPROTO_TCP)
		return nb_rev_tcp_put(cookie, 4, &be->address, be->port, &vip, vport, rev_nat_id);

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&val, 0, sizeof(val));
	key.cookie = cookie;
	key.address = be->address;
	key.port = be->port;
	val.address = vip;
	val.port = vport;
	val.rev_nat_tag = (__u16)rev_nat_id;

	cur = bpf_map_lookup_elem(&nb_lb4_rev_sk, &key);
	if (cur && cur->address == val.address && cur->port == val.port &&
	    cur->rev_nat_tag == val.rev_nat_tag)
		return 0;
	return bpf_map_update_elem(&nb_lb4_rev_sk, &key, &val, BPF_ANY);
}

/* Replace mode? Sets the outcome when not (observe, no config). */
static __always_inline int nb_replace_mode(struct nb_fwd *res)
{
	const __u32 zero = 0;
	struct nb_config *cfg = bpf_map_lookup_elem(&nb_config, &zero);

	if (!cfg) {
		res->outcome = NB_CTR_NO_CONFIG;
		return 0;
	}
	if (cfg->mode != NB_MODE_REPLACE) {
		res->outcome = NB_CTR_OBSERVED;
		return 0;
	}
	return 1;
}

/* Replace mode, and a socket the socket LB serves? Sets the outcome when
 * not. With socketLB.hostNamespaceOnly only sockets of the host's netns
 * (the cookie the agent wrote) are translated: a pod's socket keeps the
 * Service address it asked for, and the pod interface's tc program
 * (nb_pod_ingress) translates its packets instead (Cilium's ctx_in_hostns). */
static __always_inline int nb_sock_replace(struct bpf_sock_addr *ctx, struct nb_fwd *res)
{
	const __u32 zero = 0;
	struct nb_config *cfg = bpf_map_lookup_elem(&nb_config, &zero);

	if (!cfg) {
		res->outcome = NB_CTR_NO_CONFIG;
		return 0;
	}
	if (cfg->mode != NB_MODE_REPLACE) {
		res->outcome = NB_CTR_OBSERVED;
		return 0;
	}
	if ((cfg->flags & NB_CFG_F_HOST_NS_ONLY) &&
	    bpf_get_netns_cookie(ctx) != cfg->host_netns) {
		res->outcome = NB_CTR_SOCK_POD_NS;
		return 0;
	}
	return 1;
}

/* A TCP connect's draw, without a helper call: the socket's cookie (no two
 * sockets share one) plus this CPU's count of translated connects (one more
 * at every connect, so a socket that connects again draws again), through
 * splitmix64's finalizer, whose every output bit depends on every input bit.
 * As uniform over the slots as bpf_get_prandom_u32(), which cost 7% of
 * connect4's run time (results/bench/connect4-cost.md); neither is secret,
 * nor is kube-proxy's `-m statistic --probability`. */
static __always_inline __u32 nb_draw(__u64 cookie)
{
	__u32 idx = NB_CTR_CONNECT_XLATED;
	__u64 *n = bpf_map_lookup_elem(&nb_counters, &idx);
	__u64 z = cookie + (n ? *n : 0) * 0x9e3779b97f4a7c15ULL;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return (__u32)(z ^ (z >> 31));
}

/* Slot to use for a new selection: TCP a fresh draw per connect; UDP per
 * socket (`cookie`: the socket's), so a socket keeps its backend. */
static __always_inline __u16 nb_pick_slot(__u64 cookie, __u32 proto, __u16 count)
{
	__u32 sel;

	if (proto == IPPROTO_TCP)
		sel = nb_draw(cookie);
	else
		sel = (__u32)cookie;
	return (__u16)((sel % count) + 1);
}

/*
 * The v4 core: vip:vport (proto) -> backend, into *out. Shared by connect4 /
 * sendmsg4 (ctx->user_ip4) and the *6 hooks for IPv4-mapped destinations.
 */
static __always_inline struct nb_fwd
__nb_xlate_fwd4(struct bpf_sock_addr *ctx, __be32 vip, __be16 vport, __u32 proto,
		struct nb_l4_v4 *out)
{
	struct nb_fwd res = { .outcome = NB_CTR_NOT_SERVICE, .reject_errno = 0 };
	struct nb_lb4_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb4_backend *be = 0, inline_be;
	__u32 backend_id = 0;
	__u64 client = 0, cookie;
	__u32 rev_nat_id;
	int affinity;

	/* The destination, for a flow event even when it is no Service. */
	res.vip[0] = vip;
	res.vport = vport;
	res.proto = (__u8)proto;
	res.family = 4;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		res.outcome = NB_CTR_PROTO_UNSUPPORTED;
		return res;
	}

	nb_set_key(&key, vip, vport, (__u8)proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &key);
	if (!svc)
		return res;
	nb_fwd_frontend(&res, svc, &vip, 4, vport, proto);
	if (!nb_sock_replace(ctx, &res))
		return res;
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		/* The socket's source is not known at connect(): an LB IP with
		 * source ranges is left to the per-packet path and the load
		 * balancer, which see it. */
		res.outcome = NB_CTR_SRC_RANGE_PASSED;
		return res;
	}

	rev_nat_id = svc->rev_nat_index;
	affinity = svc->flags & NB_SVC_F_AFFINITY;
	/* Once: the UDP slot and the reverse entry both key on it. */
	cookie = bpf_get_socket_cookie(ctx);

	if (affinity) {
		client = bpf_get_netns_cookie(ctx);
		backend_id = nb_affinity_lookup(svc, client, rev_nat_id);
		if (backend_id) {
			be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
			if (be) {
				nb_count(NB_CTR_AFFINITY_HIT);
				res.affinity_hit = 1;
			} else {
				backend_id = 0;
			}
		}
	}

	if (!backend_id) {
		if (svc->count == 0) {
			res.outcome = NB_CTR_NO_BACKEND;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		key.backend_slot = nb_pick_slot(cookie, proto, svc->count);
		slot = bpf_map_lookup_elem(&nb_lb4_svc, &key);
		if (!slot) {
			res.outcome = NB_CTR_NO_BACKEND_SLOT;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		backend_id = slot->backend_id;
		if (slot->backend_addr) {
			/* The slot carries its backend (lb.h): no nb_lb4_be lookup. */
			inline_be.address = slot->backend_addr;
			inline_be.port = slot->backend_port;
			inline_be.proto = (__u8)proto;
			inline_be.state = NB_BE_ACTIVE;
			be = &inline_be;
		} else {
			be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
		}
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

	if (nb_rev_sk_update(cookie, proto, be, vip, vport, rev_nat_id) < 0) {
		res.outcome = NB_CTR_REV_SK_UPDATE_FAIL;
		res.reject_errno = ENOMEM;
		return res;
	}

	out->addr = be->address;
	out->port = be->port;
	res.backend_id = backend_id;
	res.backend[0] = be->address;
	res.backend_port = be->port;
	res.outcome = NB_CTR_CONNECT_XLATED;
	return res;
}

static __always_inline struct nb_fwd __nb_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct nb_l4_v4 be;
	struct nb_fwd res;

	res = __nb_xlate_fwd4(ctx, ctx->user_ip4, ctx_dport(ctx), ctx->protocol, &be);
	if (res.outcome == NB_CTR_CONNECT_XLATED) {
		ctx->user_ip4 = be.addr;
		ctx->user_port = (__u32)be.port;
	}
	return res;
}

static __always_inline void nb_flow_stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&nb_flow_stats, &idx);

	if (v)
		*v += 1;
}

#define NB_NS_PER_SEC 1000000000ULL

/* The per-CPU token bucket: may this CPU emit one more event now? */
static __always_inline int nb_flow_admit(__u32 rate)
{
	const __u32 zero = 0;
	struct nb_flow_bucket *b = bpf_map_lookup_elem(&nb_flow_rl, &zero);
	__u64 now, cap, elapsed, tokens;

	if (!b)
		return 0;
	now = bpf_ktime_get_ns();
	cap = (__u64)rate * NB_NS_PER_SEC;
	elapsed = now - b->last_ns;
	if (elapsed >= NB_NS_PER_SEC) {
		tokens = cap;
	} else {
		/* elapsed < 1e9 and rate < 2^32: no overflow */
		tokens = b->tokens + elapsed * rate;
		if (tokens > cap)
			tokens = cap;
	}
	b->last_ns = now;
	if (tokens < NB_NS_PER_SEC) {
		b->tokens = tokens;
		return 0;
	}
	b->tokens = tokens - NB_NS_PER_SEC;
	return 1;
}

static __always_inline __u8 nb_flow_verdict(const struct nb_fwd *res)
{
	switch (res->outcome) {
	case NB_CTR_CONNECT_XLATED:
		return res->affinity_hit ? NB_FLOW_AFFINITY_HIT : NB_FLOW_TRANSLATED;
	case NB_CTR_NO_BACKEND:
	case NB_CTR_NO_BACKEND_SLOT:
	case NB_CTR_BACKEND_MISSING:
		return NB_FLOW_REFUSED;
	case NB_CTR_REV_SK_UPDATE_FAIL:
		return NB_FLOW_ERROR;
	case NB_CTR_OBSERVED:
		return NB_FLOW_OBSERVED;
	case NB_CTR_SRC_RANGE_PASSED:
		return NB_FLOW_SRC_RANGE;
	default:
		return 0;
	}
}

/* A record to fill when events are on (`all`: also for destinations that
 * are no Service) and this CPU's budget allows (NULL otherwise, counted);
 * hand it to nb_flow_commit. */
static __always_inline struct nb_flow_event *nb_flow_begin(int all)
{
	const __u32 zero = 0;
	struct nb_flow_cfg *cfg;
	struct nb_flow_event *ev;

	cfg = bpf_map_lookup_elem(&nb_flow_cfg, &zero);
	if (!cfg || !cfg->enabled)
		return NULL;
	if (all && !(cfg->enabled & NB_FLOW_CFG_ALL))
		return NULL;
	if (!nb_flow_admit(cfg->rate ? cfg->rate : NB_FLOW_RATE_DEFAULT)) {
		nb_flow_stat(NB_FLOW_STAT_RATE_LIMITED);
		return NULL;
	}
	ev = bpf_ringbuf_reserve(&nb_flow_ring, sizeof(*ev), 0);
	if (!ev) {
		nb_flow_stat(NB_FLOW_STAT_RING_FULL);
		return NULL;
	}
	return ev;
}

static __always_inline void nb_flow_commit(struct nb_flow_event *ev)
{
	bpf_ringbuf_submit(ev, bpf_ringbuf_query(&nb_flow_ring, BPF_RB_AVAIL_DATA) >=
				       NB_FLOW_WAKE_BYTES ?
				       BPF_RB_FORCE_WAKEUP :
				       BPF_RB_NO_WAKEUP);
	nb_flow_stat(NB_FLOW_STAT_EMITTED);
}

/* One flow event for a decision on a Service address, when events are on
 * and this CPU's budget allows; otherwise at most a counter. */
static __always_inline void nb_flow_emit(struct bpf_sock_addr *ctx, const struct nb_fwd *res,
					 __u8 hook)
{
	struct nb_flow_event *ev;
	__u8 verdict;
	int all = 0;

	if (res->svc_found) {
		verdict = nb_flow_verdict(res);
	} else {
		/* Not about a Service: only for watchers that asked. */
		verdict = res->outcome == NB_CTR_NOT_SERVICE	   ? NB_FLOW_NOT_SERVICE :
			  res->outcome == NB_CTR_PROTO_UNSUPPORTED ? NB_FLOW_UNSUPPORTED :
								     0;
		all = 1;
	}
	if (!verdict)
		return;
	ev = nb_flow_begin(all);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->netns_cookie = bpf_get_netns_cookie(ctx);
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->vip[0] = res->vip[0];
	ev->vip[1] = res->vip[1];
	ev->vip[2] = res->vip[2];
	ev->vip[3] = res->vip[3];
	ev->backend[0] = res->backend[0];
	ev->backend[1] = res->backend[1];
	ev->backend[2] = res->backend[2];
	ev->backend[3] = res->backend[3];
	ev->backend_id = res->backend_id;
	ev->outcome = res->outcome;
	ev->vport = res->vport;
	ev->backend_port = res->backend_port;
	ev->svc_id = res->svc_id;
	ev->proto = res->proto;
	ev->family = res->family;
	ev->verdict = verdict;
	ev->hook = hook;
	ev->pad = 0;
	ev->client[0] = 0;
	ev->client[1] = 0;
	ev->client[2] = 0;
	ev->client[3] = 0;
	ev->client_port = 0;
	ev->pad2 = 0;
	ev->pad3 = 0;
	nb_flow_commit(ev);
}

/* A flow event from the per-packet path: a new external flow translated
 * (backend != NULL), or dropped: for want of a backend, or (outcome
 * NB_CTR_NP_SRC_RANGE_DENIED) from outside the Service's source ranges.
 * Addresses are 4 words (IPv4 in [0], the rest zero); ports in network
 * order. */
static __always_inline void nb_flow_packet(const __be32 *client, __be16 cport, const __be32 *vip,
					   __be16 vport, const __be32 *backend, __be16 bport,
					   __u32 backend_id, __u32 svc_id, __u8 proto, __u8 family,
					   __u32 outcome)
{
	struct nb_flow_event *ev = nb_flow_begin(0);

	if (!ev)
		return;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	/* Four words each, as in the socket path (IPv4 callers pass [0] and
	 * zeros). */
	ev->client[0] = client[0];
	ev->client[1] = client[1];
	ev->client[2] = client[2];
	ev->client[3] = client[3];
	ev->vip[0] = vip[0];
	ev->vip[1] = vip[1];
	ev->vip[2] = vip[2];
	ev->vip[3] = vip[3];
	if (backend) {
		ev->backend[0] = backend[0];
		ev->backend[1] = backend[1];
		ev->backend[2] = backend[2];
		ev->backend[3] = backend[3];
		ev->backend_port = bport;
		ev->backend_id = backend_id;
	}
	ev->client_port = cport;
	ev->vport = vport;
	ev->svc_id = svc_id;
	ev->outcome = outcome;
	ev->proto = proto;
	ev->family = family;
	ev->verdict = backend ? NB_FLOW_TRANSLATED
			      : outcome == NB_CTR_NP_SRC_RANGE_DENIED ? NB_FLOW_DENIED : NB_FLOW_REFUSED;
	ev->hook = NB_FLOW_HOOK_PACKET;
	nb_flow_commit(ev);
}

static __always_inline int nb_fwd_verdict(struct bpf_sock_addr *ctx, struct nb_fwd res,
					  __u32 xlated_ctr)
{
	nb_flow_emit(ctx, &res, xlated_ctr == NB_CTR_CONNECT_XLATED ? NB_FLOW_HOOK_CONNECT
								     : NB_FLOW_HOOK_SENDMSG);
	if (res.svc_found) {
		if (res.outcome == NB_CTR_CONNECT_XLATED) {
			nb_svc_count(res.svc_id, NB_SVC_XLATED);
			if (res.affinity_hit)
				nb_svc_count(res.svc_id, NB_SVC_AFFINITY);
		} else if (res.reject_errno == ECONNREFUSED) {
			nb_svc_count(res.svc_id, NB_SVC_REFUSED);
		}
	}
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
	return nb_fwd_verdict(ctx, __nb_xlate_fwd(ctx), NB_CTR_CONNECT_XLATED);
}

SEC("cgroup/sendmsg4")
int nb_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return nb_fwd_verdict(ctx, __nb_xlate_fwd(ctx), NB_CTR_SENDMSG_XLATED);
}

/*
 * The v4 reverse core: (socket, backend addr:port) -> VIP:port into *io.
 * Returns the outcome.
 */
static __always_inline __u32 __nb_xlate_rev4(struct bpf_sock_addr *ctx, __u32 proto,
					     struct nb_l4_v4 *io, __u32 xlated,
					     __u32 no_entry)
{
	struct nb_lb4_rev_sk_key key;
	struct nb_lb4_rev_sk_val *val;
	struct nb_lb4_key skey;
	struct nb_lb4_service *svc;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address = io->addr;
	key.port = io->port;

	if (proto == IPPROTO_TCP) {
		struct nb_rev_tcp r;

		if (nb_rev_tcp_get(key.cookie, 4, &io->addr, io->port, &r)) {
			nb_set_key(&skey, r.vip[0], r.vport, (__u8)proto, 0);
			svc = bpf_map_lookup_elem(&nb_lb4_svc, &skey);
			if (!svc || (__u16)svc->rev_nat_index != r.rev_nat_tag)
				return NB_CTR_REV_STALE;
			io->addr = r.vip[0];
			io->port = r.vport;
			return xlated;
		}
		/* Not there: a socket connected before this layout (its entry
		 * is in the LRU map), or its slot was taken since. */
	}

	val = bpf_map_lookup_elem(&nb_lb4_rev_sk, &key);
	if (!val)
		return no_entry;

	nb_set_key(&skey, val->address, val->port, (__u8)proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &skey);
	if (!svc || (__u16)svc->rev_nat_index != val->rev_nat_tag) {
		bpf_map_delete_elem(&nb_lb4_rev_sk, &key);
		return NB_CTR_REV_STALE;
	}

	io->addr = val->address;
	io->port = val->port;
	return xlated;
}

/* Reverse translation: backend -> VIP for the app's view. Returns outcome. */
static __always_inline __u32 __nb_xlate_rev(struct bpf_sock_addr *ctx,
					    __u32 xlated, __u32 no_entry)
{
	struct nb_l4_v4 io = { .addr = ctx->user_ip4, .port = ctx_dport(ctx) };
	__u32 outcome = __nb_xlate_rev4(ctx, ctx->protocol, &io, xlated, no_entry);

	if (outcome == xlated) {
		ctx->user_ip4 = io.addr;
		ctx->user_port = (__u32)io.port;
	}
	return outcome;
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

/* ---- AF_INET6 sockets ---------------------------------------------------- */

/* An IPv6 address and port (network order), as in bpf_sock_addr.user_ip6. */
struct nb_l4_v6 {
	__be32 addr[4];
	__be16 port;
};

/* ctx->user_ip6 and the port. Each word is read on its own (ctx rule). */
static __always_inline void nb_read6(const struct bpf_sock_addr *ctx, struct nb_l4_v6 *a)
{
	a->addr[0] = ctx->user_ip6[0];
	a->addr[1] = ctx->user_ip6[1];
	a->addr[2] = ctx->user_ip6[2];
	a->addr[3] = ctx->user_ip6[3];
	a->port = ctx_dport(ctx);
}

static __always_inline void nb_write6(struct bpf_sock_addr *ctx, const __be32 *addr,
				      __be16 port)
{
	ctx->user_ip6[0] = addr[0];
	ctx->user_ip6[1] = addr[1];
	ctx->user_ip6[2] = addr[2];
	ctx->user_ip6[3] = addr[3];
	ctx->user_port = (__u32)port;
}

/* ::ffff:a.b.c.d ? */
static __always_inline int nb_is_v4_mapped(const struct nb_l4_v6 *a)
{
	return a->addr[0] == 0 && a->addr[1] == 0 &&
	       a->addr[2] == __builtin_bswap32(0x0000ffff);
}

static __always_inline void nb_write6_mapped(struct bpf_sock_addr *ctx, __be32 addr,
					     __be16 port)
{
	__be32 mapped[4] = { 0, 0, __builtin_bswap32(0x0000ffff), addr };

	nb_write6(ctx, mapped, port);
}

static __always_inline void nb_set_key6(struct nb_lb6_key *key, const __be32 *addr,
					__be16 port, __u8 proto, __u16 slot)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->address[0] = addr[0];
	key->address[1] = addr[1];
	key->address[2] = addr[2];
	key->address[3] = addr[3];
	key->dport = port;
	key->proto = proto;
	key->backend_slot = slot;
}

static __always_inline int nb_addr6_eq(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int
nb_rev_sk6_update(__u64 cookie, __u32 proto, const struct nb_lb6_backend *be,
		  const struct nb_l4_v6 *vip, __u32 rev_nat_id)
{
	struct nb_lb6_rev_sk_key key;
	struct nb_lb6_rev_sk_val val, *cur;

	if (proto == IPPROTO_TCP)
		return nb_rev_tcp_put(cookie, 6, be->address, be->port, vip->addr, vip->port,
				      rev_nat_id);

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&val, 0, sizeof(val));
	key.cookie = cookie;
	key.address[0] = be->address[0];
	key.address[1] = be->address[1];
	key.address[2] = be->address[2];
	key.address[3] = be->address[3];
	key.port = be->port;
	val.address[0] = vip->addr[0];
	val.address[1] = vip->addr[1];
	val.address[2] = vip->addr[2];
	val.address[3] = vip->addr[3];
	val.port = vip->port;
	val.rev_nat_tag = (__u16)rev_nat_id;

	cur = bpf_map_lookup_elem(&nb_lb6_rev_sk, &key);
	if (cur && nb_addr6_eq(cur->address, val.address) && cur->port == val.port &&
	    cur->rev_nat_tag == val.rev_nat_tag)
		return 0;
	return bpf_map_update_elem(&nb_lb6_rev_sk, &key, &val, BPF_ANY);
}

/* The v6 core: IPv6 VIP -> backend, the same steps as the v4 core. */
static __always_inline struct nb_fwd
__nb_xlate_fwd6(struct bpf_sock_addr *ctx, const struct nb_l4_v6 *vip, __u32 proto,
		struct nb_l4_v6 *out)
{
	struct nb_fwd res = { .outcome = NB_CTR_NOT_SERVICE, .reject_errno = 0 };
	struct nb_lb6_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb6_backend *be = 0;
	__u32 backend_id = 0;
	__u64 client = 0, cookie;
	__u32 rev_nat_id;
	int affinity;

	/* The destination, for a flow event even when it is no Service. */
	res.vip[0] = vip->addr[0];
	res.vip[1] = vip->addr[1];
	res.vip[2] = vip->addr[2];
	res.vip[3] = vip->addr[3];
	res.vport = vip->port;
	res.proto = (__u8)proto;
	res.family = 6;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		res.outcome = NB_CTR_PROTO_UNSUPPORTED;
		return res;
	}

	nb_set_key6(&key, vip->addr, vip->port, (__u8)proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb6_svc, &key);
	if (!svc)
		return res;
	nb_fwd_frontend(&res, svc, vip->addr, 6, vip->port, proto);
	if (!nb_sock_replace(ctx, &res))
		return res;
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		/* As for IPv4: the source is not known at connect(). */
		res.outcome = NB_CTR_SRC_RANGE_PASSED;
		return res;
	}

	rev_nat_id = svc->rev_nat_index;
	affinity = svc->flags & NB_SVC_F_AFFINITY;
	/* Once: the UDP slot and the reverse entry both key on it. */
	cookie = bpf_get_socket_cookie(ctx);

	if (affinity) {
		client = bpf_get_netns_cookie(ctx);
		backend_id = nb_affinity_lookup(svc, client, rev_nat_id);
		if (backend_id) {
			be = bpf_map_lookup_elem(&nb_lb6_be, &backend_id);
			if (be) {
				nb_count(NB_CTR_AFFINITY_HIT);
				res.affinity_hit = 1;
			} else {
				backend_id = 0;
			}
		}
	}

	if (!backend_id) {
		if (svc->count == 0) {
			res.outcome = NB_CTR_NO_BACKEND;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		key.backend_slot = nb_pick_slot(cookie, proto, svc->count);
		slot = bpf_map_lookup_elem(&nb_lb6_svc, &key);
		if (!slot) {
			res.outcome = NB_CTR_NO_BACKEND_SLOT;
			res.reject_errno = ECONNREFUSED;
			return res;
		}
		backend_id = slot->backend_id;
		be = bpf_map_lookup_elem(&nb_lb6_be, &backend_id);
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

	if (nb_rev_sk6_update(cookie, proto, be, vip, rev_nat_id) < 0) {
		res.outcome = NB_CTR_REV_SK_UPDATE_FAIL;
		res.reject_errno = ENOMEM;
		return res;
	}

	out->addr[0] = be->address[0];
	out->addr[1] = be->address[1];
	out->addr[2] = be->address[2];
	out->addr[3] = be->address[3];
	out->port = be->port;
	res.backend_id = backend_id;
	res.backend[0] = be->address[0];
	res.backend[1] = be->address[1];
	res.backend[2] = be->address[2];
	res.backend[3] = be->address[3];
	res.backend_port = be->port;
	res.outcome = NB_CTR_CONNECT_XLATED;
	return res;
}

static __always_inline struct nb_fwd __nb_xlate_fwd_sk6(struct bpf_sock_addr *ctx)
{
	struct nb_l4_v6 dst, be6;
	struct nb_fwd res;

	nb_read6(ctx, &dst);
	if (nb_is_v4_mapped(&dst)) {
		struct nb_l4_v4 be4;

		res = __nb_xlate_fwd4(ctx, dst.addr[3], dst.port, ctx->protocol, &be4);
		if (res.outcome == NB_CTR_CONNECT_XLATED)
			nb_write6_mapped(ctx, be4.addr, be4.port);
		return res;
	}
	res = __nb_xlate_fwd6(ctx, &dst, ctx->protocol, &be6);
	if (res.outcome == NB_CTR_CONNECT_XLATED)
		nb_write6(ctx, be6.addr, be6.port);
	return res;
}

SEC("cgroup/connect6")
int nb_sock6_connect(struct bpf_sock_addr *ctx)
{
	return nb_fwd_verdict(ctx, __nb_xlate_fwd_sk6(ctx), NB_CTR_CONNECT_XLATED);
}

/* A v4-mapped sendmsg on an AF_INET6 socket reaches sendmsg4 (the kernel
 * hands it to udp_sendmsg); handled here too, for older kernels' paths. */
SEC("cgroup/sendmsg6")
int nb_sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return nb_fwd_verdict(ctx, __nb_xlate_fwd_sk6(ctx), NB_CTR_SENDMSG_XLATED);
}

static __always_inline __u32 __nb_xlate_rev6(struct bpf_sock_addr *ctx,
					     const struct nb_l4_v6 *src, __u32 xlated,
					     __u32 no_entry)
{
	struct nb_lb6_rev_sk_key key;
	struct nb_lb6_rev_sk_val *val;
	struct nb_lb6_key skey;
	struct nb_lb4_service *svc;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address[0] = src->addr[0];
	key.address[1] = src->addr[1];
	key.address[2] = src->addr[2];
	key.address[3] = src->addr[3];
	key.port = src->port;

	if (ctx->protocol == IPPROTO_TCP) {
		struct nb_rev_tcp r;

		if (nb_rev_tcp_get(key.cookie, 6, src->addr, src->port, &r)) {
			nb_set_key6(&skey, r.vip, r.vport, IPPROTO_TCP, 0);
			svc = bpf_map_lookup_elem(&nb_lb6_svc, &skey);
			if (!svc || (__u16)svc->rev_nat_index != r.rev_nat_tag)
				return NB_CTR_REV_STALE;
			nb_write6(ctx, r.vip, r.vport);
			return xlated;
		}
		/* As for IPv4: fall back to the LRU map. */
	}

	val = bpf_map_lookup_elem(&nb_lb6_rev_sk, &key);
	if (!val)
		return no_entry;

	nb_set_key6(&skey, val->address, val->port, (__u8)ctx->protocol, 0);
	svc = bpf_map_lookup_elem(&nb_lb6_svc, &skey);
	if (!svc || (__u16)svc->rev_nat_index != val->rev_nat_tag) {
		bpf_map_delete_elem(&nb_lb6_rev_sk, &key);
		return NB_CTR_REV_STALE;
	}

	nb_write6(ctx, val->address, val->port);
	return xlated;
}

static __always_inline __u32 __nb_xlate_rev_sk6(struct bpf_sock_addr *ctx,
						__u32 xlated, __u32 no_entry)
{
	struct nb_l4_v6 src;

	nb_read6(ctx, &src);
	if (nb_is_v4_mapped(&src)) {
		struct nb_l4_v4 io = { .addr = src.addr[3], .port = src.port };
		__u32 outcome = __nb_xlate_rev4(ctx, ctx->protocol, &io, xlated, no_entry);

		if (outcome == xlated)
			nb_write6_mapped(ctx, io.addr, io.port);
		return outcome;
	}
	return __nb_xlate_rev6(ctx, &src, xlated, no_entry);
}

SEC("cgroup/recvmsg6")
int nb_sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	nb_count(__nb_xlate_rev_sk6(ctx, NB_CTR_RECVMSG_XLATED, NB_CTR_RECVMSG_NO_ENTRY));
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int nb_sock6_getpeername(struct bpf_sock_addr *ctx)
{
	nb_count(__nb_xlate_rev_sk6(ctx, NB_CTR_PEER_XLATED, NB_CTR_PEER_NO_ENTRY));
	return SYS_PROCEED;
}

/* ---- Per-packet path for traffic from outside the node (tc / TCX) -------
 *
 * nb_np_ingress on the external interface's ingress, nb_np_egress on its
 * egress. A new flow to an external frontend (NB_SVC_F_EXTERNAL: NodePort on
 * a node address, externalIP, LB IP) picks a backend; the flow's two
 * nb_ct4 entries then rewrite every packet of it in both directions:
 *   externalTrafficPolicy Cluster, remote backend: DNAT + SNAT to the node's
 *     address (nb_np_dev), the reply comes back through this interface;
 *   local backend (either policy): DNAT only, the client address is kept, the
 *     reply leaves through this interface's egress and is rewritten there;
 *   externalTrafficPolicy Local: only slots 1..local_count (backends on this
 *     node); none: dropped, as kube-proxy drops.
 * Packets that are not for an external frontend pass untouched.
 */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_CT4);
	__type(key, struct nb_ct4_key);
	__type(value, struct nb_ct4_val);
} nb_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_NP_DEV);
	__type(key, __u32);
	__type(value, struct nb_np_dev);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_np_dev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_MAGLEV);
	__type(key, __u32);
	__type(value, struct nb_maglev);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NB_DEFAULT_SRC_RANGE);
	__type(key, struct nb_src_range_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb4_src_range SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nb_ct_timeouts);
} nb_ct_timeout SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_CT6);
	__type(key, struct nb_ct6_key);
	__type(value, struct nb_ct6_val);
} nb_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NB_DEFAULT_NP_DEV);
	__type(key, __u32);
	__type(value, struct nb_np_dev6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_np_dev6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NB_DEFAULT_SRC_RANGE);
	__type(key, struct nb_src_range6_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} nb_lb6_src_range SEC(".maps");

/* The flow's Maglev hash: its source (address, port), destination port and
 * protocol, not the destination address, so a flow reaching any node's
 * address (or an LB IP) hashes alike; splitmix64's finalizer. Must equal
 * maglev::flow_hash in src/maglev.rs. */
static __always_inline __u32 nb_flow_hash(const struct nb_ct4_key *k)
{
	__u64 h = ((__u64)bpf_ntohl(k->saddr) << 32) |
		  ((__u64)bpf_ntohs(k->sport) << 16) | bpf_ntohs(k->dport);

	h ^= (__u64)k->proto << 56;
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebULL;
	h ^= h >> 31;
	return (__u32)h;
}

#define NB_IP_CSUM_OFF   (ETH_HLEN + __builtin_offsetof(struct iphdr, check))
#define NB_IP_SRC_OFF    (ETH_HLEN + __builtin_offsetof(struct iphdr, saddr))
#define NB_IP_DST_OFF    (ETH_HLEN + __builtin_offsetof(struct iphdr, daddr))
#define NB_SNAT_PORT_MIN 32768
#define NB_SNAT_PORT_N   28232 /* 32768..60999, Linux's ephemeral range */

#define NB_TCP_FIN 0x01
#define NB_TCP_SYN 0x02
#define NB_TCP_RST 0x04
#define NB_TCP_ACK 0x10

/* The packet's tuple, where its L4 header starts and its TCP flags (0 for
 * UDP); 0 if not IPv4 TCP/UDP (or a non-first fragment). */
static __always_inline int nb_np_parse(struct __sk_buff *skb, struct nb_ct4_key *k,
				       __u32 *l4_off, __u8 *tcpf)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u16 *ports;
	__u32 off;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	off = ETH_HLEN + ip->ihl * 4;
	ports = data + off;
	if ((void *)(ports + 2) > end)
		return 0;
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = ip->saddr;
	k->daddr = ip->daddr;
	k->sport = ports[0];
	k->dport = ports[1];
	k->proto = ip->protocol;
	*l4_off = off;
	*tcpf = 0;
	if (ip->protocol == IPPROTO_TCP) {
		__u8 *fl = data + off + 13; /* the flags byte of the TCP header */

		if ((void *)(fl + 1) > end)
			return 0;
		*tcpf = *fl;
	}
	return 1;
}

/* Rewrites one address (src or dst) and its checksums. */
static __always_inline int nb_np_set_addr(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
					  __u32 ip_off, __be32 from, __be32 to)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
							 : __builtin_offsetof(struct udphdr, check));
	__u64 flags = BPF_F_PSEUDO_HDR | sizeof(to);

	if (from == to)
		return 0;
	if (proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, NB_IP_CSUM_OFF, from, to, sizeof(to)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ip_off, &to, sizeof(to), 0);
}

/* Rewrites one port (src: which 0, dst: which 1) and the L4 checksum. */
static __always_inline int nb_np_set_port(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
					  int which, __be16 from, __be16 to)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
							 : __builtin_offsetof(struct udphdr, check));
	__u64 flags = sizeof(to);

	if (from == to)
		return 0;
	if (proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, l4_off + which * sizeof(__be16), &to, sizeof(to), 0);
}

/* Applies a tracked rewrite to the packet whose tuple is *k. */
static __always_inline int nb_np_rewrite(struct __sk_buff *skb, __u32 l4_off,
					 const struct nb_ct4_key *k,
					 const struct nb_ct4_val *v)
{
	if (nb_np_set_addr(skb, l4_off, k->proto, NB_IP_SRC_OFF, k->saddr, v->saddr) < 0 ||
	    nb_np_set_addr(skb, l4_off, k->proto, NB_IP_DST_OFF, k->daddr, v->daddr) < 0 ||
	    nb_np_set_port(skb, l4_off, k->proto, 0, k->sport, v->sport) < 0 ||
	    nb_np_set_port(skb, l4_off, k->proto, 1, k->dport, v->dport) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/*
 * A SNATed flow's packets carry one of the node's own addresses as source
 * after the rewrite (the SNAT address forward, the frontend's reply), which
 * the input route refuses (martian source): they go straight out of the
 * interface the FIB names through bpf_redirect_neigh (neighbour resolution
 * included), like Cilium's nodeport path.
 */
static __always_inline int nb_np_redirect(struct __sk_buff *skb, const struct nb_ct4_val *v,
					  __u8 proto)
{
	struct bpf_fib_lookup fib;
	long rc;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = 2; /* AF_INET */
	fib.l4_protocol = proto;
	fib.ipv4_src = v->saddr;
	fib.ipv4_dst = v->daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	/* The neighbour subsystem fills in the Ethernet header (and resolves
	 * the next hop when it has no entry yet). */
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

static __always_inline __u32 nb_now_sec(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

/* Lapsed: its expiry has passed (wrap-safe). */
static __always_inline int nb_ct_lapsed(__u32 expires, __u32 now)
{
	return (__s32)(now - expires) > 0;
}

/* How long an entry lives after this packet (seconds). */
static __always_inline __u32 nb_ct_lifetime(__u8 proto, __u8 tcpf, __u8 ctflags)
{
	const __u32 zero = 0;
	struct nb_ct_timeouts *t = bpf_map_lookup_elem(&nb_ct_timeout, &zero);
	__u32 v;

	if (proto != IPPROTO_TCP) {
		v = t ? t->udp : 0;
		return v ? v : NB_CT_UDP_DEFAULT;
	}
	if ((ctflags & NB_CT_F_CLOSING) || (tcpf & (NB_TCP_FIN | NB_TCP_RST))) {
		v = t ? t->tcp_close : 0;
		return v ? v : NB_CT_TCP_CLOSE_DEFAULT;
	}
	if ((tcpf & (NB_TCP_SYN | NB_TCP_ACK)) == NB_TCP_SYN) {
		v = t ? t->tcp_syn : 0;
		return v ? v : NB_CT_TCP_SYN_DEFAULT;
	}
	v = t ? t->tcp_est : 0;
	return v ? v : NB_CT_TCP_EST_DEFAULT;
}

/* The key of the entry for the other direction of the flow *v rewrites to. */
static __always_inline void nb_ct_peer_key(struct nb_ct4_key *pk, const struct nb_ct4_val *v,
					   __u8 proto)
{
	__builtin_memset(pk, 0, sizeof(*pk));
	pk->saddr = v->daddr;
	pk->sport = v->dport;
	pk->daddr = v->saddr;
	pk->dport = v->sport;
	pk->proto = proto;
}

/* Extends the flow's lifetime by this packet, in both of its entries; a
 * FIN or RST marks both closing. Writes at most once a second per entry. */
static __always_inline void nb_ct_refresh(const struct nb_ct4_key *k, struct nb_ct4_val *v,
					  __u8 tcpf, __u32 now)
{
	__u8 closing = k->proto == IPPROTO_TCP && (tcpf & (NB_TCP_FIN | NB_TCP_RST)) &&
		       !(v->flags & NB_CT_F_CLOSING);
	__u32 expires = now + nb_ct_lifetime(k->proto, tcpf, v->flags);
	struct nb_ct4_key pk;
	struct nb_ct4_val *p;

	if (expires == v->expires && !closing)
		return;
	if (closing)
		v->flags |= NB_CT_F_CLOSING;
	v->expires = expires;
	nb_ct_peer_key(&pk, v, k->proto);
	p = bpf_map_lookup_elem(&nb_ct4, &pk);
	if (p) {
		if (closing)
			p->flags |= NB_CT_F_CLOSING;
		p->expires = expires;
	}
}

/* A tracked flow's live entry for this packet, if any: counts a hit and
 * refreshes the flow. A lapsed entry, or a bare SYN on a closing flow (the
 * client reuses its port for a new connection), is a new flow. */
static __always_inline struct nb_ct4_val *nb_np_tracked(const struct nb_ct4_key *k, __u8 tcpf,
							 __u32 now)
{
	struct nb_ct4_val *v = bpf_map_lookup_elem(&nb_ct4, k);

	if (!v)
		return NULL;
	if (nb_ct_lapsed(v->expires, now)) {
		nb_count(NB_CTR_NP_CT_LAPSED);
		return NULL;
	}
	if (k->proto == IPPROTO_TCP && (v->flags & NB_CT_F_CLOSING) &&
	    !(v->flags & NB_CT_F_REPLY) && (tcpf & (NB_TCP_SYN | NB_TCP_ACK)) == NB_TCP_SYN) {
		nb_count(NB_CTR_NP_CT_REOPENED);
		return NULL;
	}
	nb_count(NB_CTR_NP_CT_HIT);
	nb_ct_refresh(k, v, tcpf, now);
	return v;
}

/* May a new flow from the client *k take over the existing reply entry *old?
 * Yes if it lapsed, or if it is the closing flow of the same client address
 * and port (the client reused its port: its old connection is over). */
static __always_inline int nb_ct_replaceable(const struct nb_ct4_val *old,
					     const struct nb_ct4_key *k, __u32 now)
{
	if (nb_ct_lapsed(old->expires, now))
		return 1;
	return (old->flags & NB_CT_F_CLOSING) && old->daddr == k->saddr && old->dport == k->sport;
}

/* Both entries of a new flow: forward (k => fwd) and its reply. With SNAT
 * the node-side port is the client's when free, else a random one. A reply
 * key held by a live flow is a clash (-2): with DNAT only, the backend
 * already has a connection with this client address and port. */
static __always_inline int nb_np_track(const struct nb_ct4_key *k, struct nb_ct4_val *fwd,
				       __u8 tcpf, __u32 now)
{
	struct nb_ct4_key rk;
	struct nb_ct4_val rv, *old;
	int i;

	fwd->expires = now + nb_ct_lifetime(k->proto, tcpf, 0);
	__builtin_memset(&rk, 0, sizeof(rk));
	__builtin_memset(&rv, 0, sizeof(rv));
	rk.saddr = fwd->daddr;
	rk.sport = fwd->dport;
	rk.daddr = fwd->saddr;
	rk.proto = k->proto;
	rv.saddr = k->daddr;
	rv.sport = k->dport;
	rv.daddr = k->saddr;
	rv.dport = k->sport;
	rv.rev_nat_index = fwd->rev_nat_index;
	rv.expires = fwd->expires;
	rv.flags = fwd->flags | NB_CT_F_REPLY;
	for (i = 0; i < 8; i++) {
		rk.dport = fwd->sport;
		if (bpf_map_update_elem(&nb_ct4, &rk, &rv, BPF_NOEXIST) == 0)
			break;
		old = bpf_map_lookup_elem(&nb_ct4, &rk);
		if (old && nb_ct_replaceable(old, k, now) &&
		    bpf_map_update_elem(&nb_ct4, &rk, &rv, BPF_ANY) == 0) {
			nb_count(NB_CTR_NP_CT_REPLACED);
			break;
		}
		if (!(fwd->flags & NB_CT_F_SNAT))
			return -2; /* DNAT only: the reply tuple is the client's own */
		fwd->sport = bpf_htons(NB_SNAT_PORT_MIN +
				       bpf_get_prandom_u32() % NB_SNAT_PORT_N);
	}
	if (i == 8)
		return -1;
	if (bpf_map_update_elem(&nb_ct4, k, fwd, BPF_ANY) < 0) {
		bpf_map_delete_elem(&nb_ct4, &rk);
		return -1;
	}
	return 0;
}

/* A new flow to an external frontend: choose, track, rewrite. */
static __always_inline int __nb_np_new(struct __sk_buff *skb, __u32 l4_off,
				       const struct nb_ct4_key *k, __u8 tcpf, __u32 now)
{
	struct nb_lb4_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb4_backend *be;
	struct nb_np_dev *dev;
	struct nb_ct4_val fwd;
	struct nb_fwd res;
	__u32 ifindex = skb->ingress_ifindex, backend_id, n, pick;
	int local_only;

	nb_set_key(&key, k->daddr, k->dport, k->proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &key);
	if (!svc || !(svc->flags & NB_SVC_F_EXTERNAL)) {
		nb_count(NB_CTR_NP_NOT_SERVICE);
		return TC_ACT_OK;
	}
	if (!nb_replace_mode(&res)) {
		nb_count(res.outcome);
		return TC_ACT_OK;
	}
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		/* loadBalancerSourceRanges: a source outside them is dropped, as
		 * kube-proxy's firewall chain drops it. */
		struct nb_src_range_key sk = {
			.prefixlen = 64,
			.rev_nat_index = svc->rev_nat_index,
			.addr = k->saddr,
		};

		if (!bpf_map_lookup_elem(&nb_lb4_src_range, &sk)) {
			__be32 c4[4] = { k->saddr }, v4[4] = { k->daddr };

			nb_count(NB_CTR_NP_SRC_RANGE_DENIED);
			nb_flow_packet(c4, k->sport, v4, k->dport, NULL, 0, 0, svc->rev_nat_index,
				       k->proto, 4, NB_CTR_NP_SRC_RANGE_DENIED);
			return TC_ACT_SHOT;
		}
	}
	local_only = svc->flags & NB_SVC_F_EXT_LOCAL;
	n = local_only ? svc->local_count : svc->count;
	if (n > svc->count)
		n = svc->count;
	if (n == 0) {
		__u32 why = local_only && svc->count ? NB_CTR_NP_NO_LOCAL_BACKEND
						      : NB_CTR_NP_NO_BACKEND;
		__be32 c4[4] = { k->saddr }, v4[4] = { k->daddr };

		nb_count(why);
		nb_svc_count(svc->rev_nat_index, NB_SVC_TC_DROPPED);
		nb_flow_packet(c4, k->sport, v4, k->dport, NULL, 0, 0, svc->rev_nat_index,
			       k->proto, 4, why);
		return TC_ACT_SHOT;
	}
	pick = bpf_get_prandom_u32() % n;
	{
		__u32 rid = svc->rev_nat_index;
		struct nb_maglev *mg = bpf_map_lookup_elem(&nb_lb4_maglev, &rid);

		if (mg && mg->size > 0 && mg->size <= NB_MAGLEV_MAX) {
			__u32 idx = nb_flow_hash(k) % mg->size;

			/* The verifier does not bound a modulo: keep the
			 * compiler from dropping the explicit check. */
			asm volatile("" : "+r"(idx));
			if (idx < NB_MAGLEV_MAX) {
				__u16 s = mg->slot[idx];

				if (s >= 1 && s <= n) {
					pick = s - 1;
					nb_count(NB_CTR_NP_MAGLEV);
				}
			}
		}
	}
	key.backend_slot = (__u16)(pick + 1);
	slot = bpf_map_lookup_elem(&nb_lb4_svc, &key);
	if (!slot) {
		nb_count(NB_CTR_NO_BACKEND_SLOT);
		return TC_ACT_SHOT;
	}
	backend_id = slot->backend_id;
	be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
	if (!be) {
		nb_count(NB_CTR_BACKEND_MISSING);
		return TC_ACT_SHOT;
	}

	__builtin_memset(&fwd, 0, sizeof(fwd));
	fwd.saddr = k->saddr;
	fwd.sport = k->sport;
	fwd.daddr = be->address;
	fwd.dport = be->port;
	fwd.rev_nat_index = svc->rev_nat_index;
	/* Remote backend (slot beyond the local ones) under policy Cluster: SNAT. */
	if (!local_only && pick >= svc->local_count) {
		dev = bpf_map_lookup_elem(&nb_np_dev, &ifindex);
		if (!dev || !dev->snat_addr) {
			nb_count(NB_CTR_NP_NO_SNAT_ADDR);
			return TC_ACT_SHOT;
		}
		fwd.saddr = dev->snat_addr;
		fwd.flags = NB_CT_F_SNAT;
	}
	{
		int rc = nb_np_track(k, &fwd, tcpf, now);

		if (rc < 0) {
			nb_count(rc == -2 ? NB_CTR_NP_CT_CLASH : NB_CTR_NP_CT_FULL);
			return TC_ACT_SHOT;
		}
	}
	nb_count(fwd.flags & NB_CT_F_SNAT ? NB_CTR_NP_SNAT : NB_CTR_NP_LOCAL);
	nb_svc_count(fwd.rev_nat_index, NB_SVC_TC_NEW);
	{
		__be32 c4[4] = { k->saddr }, v4[4] = { k->daddr }, b4[4] = { be->address };

		nb_flow_packet(c4, k->sport, v4, k->dport, b4, be->port, backend_id,
			       fwd.rev_nat_index, k->proto, 4,
			       fwd.flags & NB_CT_F_SNAT ? NB_CTR_NP_SNAT : NB_CTR_NP_LOCAL);
	}
	if (nb_np_rewrite(skb, l4_off, k, &fwd) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return fwd.flags & NB_CT_F_SNAT ? nb_np_redirect(skb, &fwd, k->proto) : TC_ACT_OK;
}

/* ---- IPv6: the same path with nb_ct6 / nb_lb6_* --------------------------- */

#define NB_IP6_SRC_OFF (ETH_HLEN + __builtin_offsetof(struct ipv6hdr, saddr))
#define NB_IP6_DST_OFF (ETH_HLEN + __builtin_offsetof(struct ipv6hdr, daddr))

static __always_inline void nb_addr6_copy(__be32 *d, const __be32 *s)
{
	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

/* As nb_np_parse for IPv6: TCP/UDP right after the fixed header (packets
 * with extension headers, fragments included, pass untouched). */
static __always_inline int nb_np_parse6(struct __sk_buff *skb, struct nb_ct6_key *k,
					__u32 *l4_off, __u8 *tcpf)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	__u16 *ports;
	__u32 off;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return 0;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > end)
		return 0;
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return 0;
	off = ETH_HLEN + sizeof(struct ipv6hdr);
	ports = data + off;
	if ((void *)(ports + 2) > end)
		return 0;
	__builtin_memset(k, 0, sizeof(*k));
	nb_addr6_copy(k->saddr, ip6->saddr.in6_u.u6_addr32);
	nb_addr6_copy(k->daddr, ip6->daddr.in6_u.u6_addr32);
	k->sport = ports[0];
	k->dport = ports[1];
	k->proto = ip6->nexthdr;
	*l4_off = off;
	*tcpf = 0;
	if (ip6->nexthdr == IPPROTO_TCP) {
		__u8 *fl = data + off + 13;

		if ((void *)(fl + 1) > end)
			return 0;
		*tcpf = *fl;
	}
	return 1;
}

/* Rewrites one IPv6 address and the L4 checksum (IPv6 has no header checksum). */
static __always_inline int nb_np_set_addr6(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
					   __u32 ip_off, __be32 *from, __be32 *to)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
							 : __builtin_offsetof(struct udphdr, check));
	__s64 diff;

	if (nb_addr6_eq(from, to))
		return 0;
	diff = bpf_csum_diff(from, 16, to, 16, 0);
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ip_off, to, 16, 0);
}

static __always_inline int nb_np_rewrite6(struct __sk_buff *skb, __u32 l4_off,
					  struct nb_ct6_key *k, struct nb_ct6_val *v)
{
	if (nb_np_set_addr6(skb, l4_off, k->proto, NB_IP6_SRC_OFF, k->saddr, v->saddr) < 0 ||
	    nb_np_set_addr6(skb, l4_off, k->proto, NB_IP6_DST_OFF, k->daddr, v->daddr) < 0 ||
	    nb_np_set_port(skb, l4_off, k->proto, 0, k->sport, v->sport) < 0 ||
	    nb_np_set_port(skb, l4_off, k->proto, 1, k->dport, v->dport) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

static __always_inline int nb_np_redirect6(struct __sk_buff *skb, const struct nb_ct6_val *v,
					   __u8 proto)
{
	struct bpf_fib_lookup fib;
	long rc;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = 10; /* AF_INET6 */
	fib.l4_protocol = proto;
	nb_addr6_copy(fib.ipv6_src, v->saddr);
	nb_addr6_copy(fib.ipv6_dst, v->daddr);
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

static __always_inline void nb_ct6_peer_key(struct nb_ct6_key *pk, const struct nb_ct6_val *v,
					    __u8 proto)
{
	__builtin_memset(pk, 0, sizeof(*pk));
	nb_addr6_copy(pk->saddr, v->daddr);
	nb_addr6_copy(pk->daddr, v->saddr);
	pk->sport = v->dport;
	pk->dport = v->sport;
	pk->proto = proto;
}

static __always_inline void nb_ct6_refresh(const struct nb_ct6_key *k, struct nb_ct6_val *v,
					   __u8 tcpf, __u32 now)
{
	__u8 closing = k->proto == IPPROTO_TCP && (tcpf & (NB_TCP_FIN | NB_TCP_RST)) &&
		       !(v->flags & NB_CT_F_CLOSING);
	__u32 expires = now + nb_ct_lifetime(k->proto, tcpf, v->flags);
	struct nb_ct6_key pk;
	struct nb_ct6_val *p;

	if (expires == v->expires && !closing)
		return;
	if (closing)
		v->flags |= NB_CT_F_CLOSING;
	v->expires = expires;
	nb_ct6_peer_key(&pk, v, k->proto);
	p = bpf_map_lookup_elem(&nb_ct6, &pk);
	if (p) {
		if (closing)
			p->flags |= NB_CT_F_CLOSING;
		p->expires = expires;
	}
}

static __always_inline struct nb_ct6_val *nb_np_tracked6(const struct nb_ct6_key *k, __u8 tcpf,
							  __u32 now)
{
	struct nb_ct6_val *v = bpf_map_lookup_elem(&nb_ct6, k);

	if (!v)
		return NULL;
	if (nb_ct_lapsed(v->expires, now)) {
		nb_count(NB_CTR_NP_CT_LAPSED);
		return NULL;
	}
	if (k->proto == IPPROTO_TCP && (v->flags & NB_CT_F_CLOSING) &&
	    !(v->flags & NB_CT_F_REPLY) && (tcpf & (NB_TCP_SYN | NB_TCP_ACK)) == NB_TCP_SYN) {
		nb_count(NB_CTR_NP_CT_REOPENED);
		return NULL;
	}
	nb_count(NB_CTR_NP_CT_HIT);
	nb_ct6_refresh(k, v, tcpf, now);
	return v;
}

static __always_inline int nb_np_track6(const struct nb_ct6_key *k, struct nb_ct6_val *fwd,
					__u8 tcpf, __u32 now)
{
	struct nb_ct6_key rk;
	struct nb_ct6_val rv, *old;
	int i;

	fwd->expires = now + nb_ct_lifetime(k->proto, tcpf, 0);
	__builtin_memset(&rk, 0, sizeof(rk));
	__builtin_memset(&rv, 0, sizeof(rv));
	nb_addr6_copy(rk.saddr, fwd->daddr);
	nb_addr6_copy(rk.daddr, fwd->saddr);
	rk.sport = fwd->dport;
	rk.proto = k->proto;
	nb_addr6_copy(rv.saddr, k->daddr);
	nb_addr6_copy(rv.daddr, k->saddr);
	rv.sport = k->dport;
	rv.dport = k->sport;
	rv.rev_nat_index = fwd->rev_nat_index;
	rv.expires = fwd->expires;
	rv.flags = fwd->flags | NB_CT_F_REPLY;
	for (i = 0; i < 8; i++) {
		rk.dport = fwd->sport;
		if (bpf_map_update_elem(&nb_ct6, &rk, &rv, BPF_NOEXIST) == 0)
			break;
		old = bpf_map_lookup_elem(&nb_ct6, &rk);
		if (old && (nb_ct_lapsed(old->expires, now) ||
			    ((old->flags & NB_CT_F_CLOSING) && nb_addr6_eq(old->daddr, k->saddr) &&
			     old->dport == k->sport)) &&
		    bpf_map_update_elem(&nb_ct6, &rk, &rv, BPF_ANY) == 0) {
			nb_count(NB_CTR_NP_CT_REPLACED);
			break;
		}
		if (!(fwd->flags & NB_CT_F_SNAT))
			return -2;
		fwd->sport = bpf_htons(NB_SNAT_PORT_MIN +
				       bpf_get_prandom_u32() % NB_SNAT_PORT_N);
	}
	if (i == 8)
		return -1;
	if (bpf_map_update_elem(&nb_ct6, k, fwd, BPF_ANY) < 0) {
		bpf_map_delete_elem(&nb_ct6, &rk);
		return -1;
	}
	return 0;
}

/* As nb_flow_hash, the source address folded to 32 bits. */
static __always_inline __u32 nb_flow_hash6(const struct nb_ct6_key *k)
{
	struct nb_ct4_key k4;

	__builtin_memset(&k4, 0, sizeof(k4));
	k4.saddr = k->saddr[0] ^ k->saddr[1] ^ k->saddr[2] ^ k->saddr[3];
	k4.sport = k->sport;
	k4.dport = k->dport;
	k4.proto = k->proto;
	return nb_flow_hash(&k4);
}

static __always_inline int __nb_np_new6(struct __sk_buff *skb, __u32 l4_off,
					struct nb_ct6_key *k, __u8 tcpf, __u32 now)
{
	struct nb_lb6_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb6_backend *be;
	struct nb_np_dev6 *dev;
	struct nb_ct6_val fwd;
	struct nb_fwd res;
	__u32 ifindex = skb->ingress_ifindex, backend_id, n, pick;
	int local_only, rc;

	nb_set_key6(&key, k->daddr, k->dport, k->proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb6_svc, &key);
	if (!svc || !(svc->flags & NB_SVC_F_EXTERNAL)) {
		nb_count(NB_CTR_NP_NOT_SERVICE);
		return TC_ACT_OK;
	}
	if (!nb_replace_mode(&res)) {
		nb_count(res.outcome);
		return TC_ACT_OK;
	}
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		struct nb_src_range6_key sk;

		__builtin_memset(&sk, 0, sizeof(sk));
		sk.prefixlen = 32 + 128;
		sk.rev_nat_index = svc->rev_nat_index;
		nb_addr6_copy(sk.addr, k->saddr);
		if (!bpf_map_lookup_elem(&nb_lb6_src_range, &sk)) {
			nb_count(NB_CTR_NP_SRC_RANGE_DENIED);
			nb_flow_packet(k->saddr, k->sport, k->daddr, k->dport, NULL, 0, 0,
				       svc->rev_nat_index, k->proto, 6, NB_CTR_NP_SRC_RANGE_DENIED);
			return TC_ACT_SHOT;
		}
	}
	local_only = svc->flags & NB_SVC_F_EXT_LOCAL;
	n = local_only ? svc->local_count : svc->count;
	if (n > svc->count)
		n = svc->count;
	if (n == 0) {
		__u32 why = local_only && svc->count ? NB_CTR_NP_NO_LOCAL_BACKEND
						      : NB_CTR_NP_NO_BACKEND;

		nb_count(why);
		nb_svc_count(svc->rev_nat_index, NB_SVC_TC_DROPPED);
		nb_flow_packet(k->saddr, k->sport, k->daddr, k->dport, NULL, 0, 0,
			       svc->rev_nat_index, k->proto, 6, why);
		return TC_ACT_SHOT;
	}
	pick = bpf_get_prandom_u32() % n;
	{
		__u32 rid = svc->rev_nat_index;
		struct nb_maglev *mg = bpf_map_lookup_elem(&nb_lb4_maglev, &rid);

		if (mg && mg->size > 0 && mg->size <= NB_MAGLEV_MAX) {
			__u32 idx = nb_flow_hash6(k) % mg->size;

			asm volatile("" : "+r"(idx));
			if (idx < NB_MAGLEV_MAX) {
				__u16 s = mg->slot[idx];

				if (s >= 1 && s <= n) {
					pick = s - 1;
					nb_count(NB_CTR_NP_MAGLEV);
				}
			}
		}
	}
	key.backend_slot = (__u16)(pick + 1);
	slot = bpf_map_lookup_elem(&nb_lb6_svc, &key);
	if (!slot) {
		nb_count(NB_CTR_NO_BACKEND_SLOT);
		return TC_ACT_SHOT;
	}
	backend_id = slot->backend_id;
	be = bpf_map_lookup_elem(&nb_lb6_be, &backend_id);
	if (!be) {
		nb_count(NB_CTR_BACKEND_MISSING);
		return TC_ACT_SHOT;
	}

	__builtin_memset(&fwd, 0, sizeof(fwd));
	nb_addr6_copy(fwd.saddr, k->saddr);
	fwd.sport = k->sport;
	nb_addr6_copy(fwd.daddr, be->address);
	fwd.dport = be->port;
	fwd.rev_nat_index = svc->rev_nat_index;
	if (!local_only && pick >= svc->local_count) {
		dev = bpf_map_lookup_elem(&nb_np_dev6, &ifindex);
		if (!dev || !(dev->snat_addr[0] | dev->snat_addr[1] | dev->snat_addr[2] |
			      dev->snat_addr[3])) {
			nb_count(NB_CTR_NP_NO_SNAT_ADDR);
			return TC_ACT_SHOT;
		}
		nb_addr6_copy(fwd.saddr, dev->snat_addr);
		fwd.flags = NB_CT_F_SNAT;
	}
	rc = nb_np_track6(k, &fwd, tcpf, now);
	if (rc < 0) {
		nb_count(rc == -2 ? NB_CTR_NP_CT_CLASH : NB_CTR_NP_CT_FULL);
		return TC_ACT_SHOT;
	}
	nb_count(fwd.flags & NB_CT_F_SNAT ? NB_CTR_NP_SNAT : NB_CTR_NP_LOCAL);
	nb_svc_count(fwd.rev_nat_index, NB_SVC_TC_NEW);
	nb_flow_packet(k->saddr, k->sport, k->daddr, k->dport, be->address, be->port, backend_id,
		       fwd.rev_nat_index, k->proto, 6,
		       fwd.flags & NB_CT_F_SNAT ? NB_CTR_NP_SNAT : NB_CTR_NP_LOCAL);
	if (nb_np_rewrite6(skb, l4_off, k, &fwd) != TC_ACT_OK)
		return TC_ACT_SHOT;
	return fwd.flags & NB_CT_F_SNAT ? nb_np_redirect6(skb, &fwd, k->proto) : TC_ACT_OK;
}

static __always_inline int nb_np_ingress6(struct __sk_buff *skb)
{
	struct nb_ct6_key k;
	struct nb_ct6_val *v;
	__u32 l4_off, now;
	__u8 tcpf;

	if (!nb_np_parse6(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	now = nb_now_sec();
	v = nb_np_tracked6(&k, tcpf, now);
	if (v && (v->flags & NB_CT_F_POD))
		return TC_ACT_OK; /* a pod's flow: rewritten at the pod's interface */
	if (v) {
		struct nb_ct6_val copy = *v;

		if (nb_np_rewrite6(skb, l4_off, &k, &copy) != TC_ACT_OK)
			return TC_ACT_SHOT;
		return copy.flags & NB_CT_F_SNAT ? nb_np_redirect6(skb, &copy, k.proto) : TC_ACT_OK;
	}
	return __nb_np_new6(skb, l4_off, &k, tcpf, now);
}

static __always_inline int nb_np_egress6(struct __sk_buff *skb)
{
	struct nb_ct6_key k;
	struct nb_ct6_val *v;
	__u32 l4_off;
	__u8 tcpf;

	if (!nb_np_parse6(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = nb_np_tracked6(&k, tcpf, nb_now_sec());
	if (v && (v->flags & NB_CT_F_REPLY) && !(v->flags & NB_CT_F_POD)) {
		struct nb_ct6_val copy = *v;

		return nb_np_rewrite6(skb, l4_off, &k, &copy);
	}
	return TC_ACT_OK;
}

SEC("classifier")
int nb_np_ingress(struct __sk_buff *skb)
{
	struct nb_ct4_key k;
	struct nb_ct4_val *v;
	__u32 l4_off, now;
	__u8 tcpf;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return nb_np_ingress6(skb);
	if (!nb_np_parse(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	now = nb_now_sec();
	v = nb_np_tracked(&k, tcpf, now);
	if (v && (v->flags & NB_CT_F_POD))
		return TC_ACT_OK; /* a pod's flow: rewritten at the pod's interface */
	if (v) {
		struct nb_ct4_val copy = *v;

		if (nb_np_rewrite(skb, l4_off, &k, &copy) != TC_ACT_OK)
			return TC_ACT_SHOT;
		return copy.flags & NB_CT_F_SNAT ? nb_np_redirect(skb, &copy, k.proto) : TC_ACT_OK;
	}
	return __nb_np_new(skb, l4_off, &k, tcpf, now);
}

/* Replies of local backends leave here: back to the frontend's address. */
SEC("classifier")
int nb_np_egress(struct __sk_buff *skb)
{
	struct nb_ct4_key k;
	struct nb_ct4_val *v;
	__u32 l4_off;
	__u8 tcpf;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return nb_np_egress6(skb);
	if (!nb_np_parse(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = nb_np_tracked(&k, tcpf, nb_now_sec());
	if (v && (v->flags & NB_CT_F_REPLY) && !(v->flags & NB_CT_F_POD)) {
		struct nb_ct4_val copy = *v;

		return nb_np_rewrite(skb, l4_off, &k, &copy);
	}
	return TC_ACT_OK;
}

/* ---- Per-packet path at the pods' interfaces (socketLB.hostNamespaceOnly) --
 *
 * With hostNamespaceOnly the socket LB leaves pods' sockets alone (so a
 * sidecar's iptables REDIRECT sees the Service address as SO_ORIGINAL_DST),
 * and these programs translate a pod's packets instead, on the host side of
 * its interface (after Cilium's bpf_lxc.c):
 *   nb_pod_ingress (packets from the pod): a new TCP/UDP flow to any
 *     frontend in nb_lb4_svc (ClusterIP, NodePort on a node address,
 *     externalIP, LB IP) picks a backend as the socket LB does (a random
 *     slot; ClientIP affinity keyed by the pod's address) and is DNATed;
 *     its two nb_ct4 entries (flag NB_CT_F_POD, lifetimes as for external
 *     flows) carry every later packet. No SNAT: the backend sees the pod.
 *   nb_pod_egress (packets toward the pod): the backend's replies get the
 *     frontend back as source, so the pod's socket sees the Service as its
 *     peer. Replies are rewritten only here, after routing (a source that is
 *     a Service address would fail the reverse-path check on the way).
 * The external interfaces' programs leave NB_CT_F_POD entries alone, and
 * these leave the external flows' entries alone.
 */

/* The affinity client of a pod flow: its IPv4 source, tagged so that it
 * never equals a netns cookie (the kernel counts those up from 1). */
#define NB_AFF_CLIENT_ADDR (1ULL << 63)

/* A pod's new flow to a frontend: choose, track, rewrite. */
static __always_inline int __nb_pod_new(struct __sk_buff *skb, __u32 l4_off,
					const struct nb_ct4_key *k, __u8 tcpf, __u32 now)
{
	struct nb_lb4_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb4_backend *be = 0;
	struct nb_ct4_val fwd;
	struct nb_fwd res;
	__u32 backend_id = 0;
	__u64 client = 0;
	__u32 rev_nat_id;
	int affinity;

	nb_set_key(&key, k->daddr, k->dport, k->proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb4_svc, &key);
	if (!svc)
		return TC_ACT_OK; /* not a Service: most packets, not counted */
	if (!nb_replace_mode(&res)) {
		nb_count(res.outcome);
		return TC_ACT_OK;
	}
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		/* As the socket LB: left to the load balancer, which applies
		 * the ranges. */
		nb_count(NB_CTR_SRC_RANGE_PASSED);
		return TC_ACT_OK;
	}
	rev_nat_id = svc->rev_nat_index;
	affinity = svc->flags & NB_SVC_F_AFFINITY;
	if (affinity) {
		client = NB_AFF_CLIENT_ADDR | bpf_ntohl(k->saddr);
		backend_id = nb_affinity_lookup(svc, client, rev_nat_id);
		if (backend_id) {
			be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
			if (be) {
				nb_count(NB_CTR_AFFINITY_HIT);
				nb_svc_count(rev_nat_id, NB_SVC_AFFINITY);
			} else {
				backend_id = 0;
			}
		}
	}
	if (!backend_id) {
		if (svc->count == 0) {
			nb_count(NB_CTR_POD_NO_BACKEND);
			nb_svc_count(rev_nat_id, NB_SVC_TC_DROPPED);
			return TC_ACT_SHOT;
		}
		key.backend_slot = (__u16)(bpf_get_prandom_u32() % svc->count + 1);
		slot = bpf_map_lookup_elem(&nb_lb4_svc, &key);
		if (!slot) {
			nb_count(NB_CTR_NO_BACKEND_SLOT);
			return TC_ACT_SHOT;
		}
		backend_id = slot->backend_id;
		be = bpf_map_lookup_elem(&nb_lb4_be, &backend_id);
		if (!be) {
			nb_count(NB_CTR_BACKEND_MISSING);
			return TC_ACT_SHOT;
		}
		if (affinity) {
			nb_affinity_update(client, rev_nat_id, backend_id);
			nb_count(NB_CTR_AFFINITY_NEW);
		}
	}
	if (!be)
		return TC_ACT_OK;

	__builtin_memset(&fwd, 0, sizeof(fwd));
	fwd.saddr = k->saddr;
	fwd.sport = k->sport;
	fwd.daddr = be->address;
	fwd.dport = be->port;
	fwd.rev_nat_index = rev_nat_id;
	fwd.flags = NB_CT_F_POD;
	if (nb_np_track(k, &fwd, tcpf, now) < 0) {
		nb_count(NB_CTR_POD_CT_FULL);
		return TC_ACT_SHOT;
	}
	nb_count(NB_CTR_POD_XLATED);
	nb_svc_count(rev_nat_id, NB_SVC_TC_NEW);
	return nb_np_rewrite(skb, l4_off, k, &fwd);
}

/* As __nb_pod_new for IPv6: nb_lb6_svc, nb_lb6_be, nb_ct6. The affinity
 * client is the pod's address folded to 62 bits, tagged apart from IPv4
 * pods' and netns cookies. */
static __always_inline int __nb_pod_new6(struct __sk_buff *skb, __u32 l4_off,
					 struct nb_ct6_key *k, __u8 tcpf, __u32 now)
{
	struct nb_lb6_key key;
	struct nb_lb4_service *svc, *slot;
	struct nb_lb6_backend *be = 0;
	struct nb_ct6_val fwd;
	struct nb_fwd res;
	__u32 backend_id = 0;
	__u64 client = 0;
	__u32 rev_nat_id;
	int affinity;

	nb_set_key6(&key, k->daddr, k->dport, k->proto, 0);
	svc = bpf_map_lookup_elem(&nb_lb6_svc, &key);
	if (!svc)
		return TC_ACT_OK;
	if (!nb_replace_mode(&res)) {
		nb_count(res.outcome);
		return TC_ACT_OK;
	}
	if (svc->flags & NB_SVC_F_SRC_RANGE) {
		nb_count(NB_CTR_SRC_RANGE_PASSED);
		return TC_ACT_OK;
	}
	rev_nat_id = svc->rev_nat_index;
	affinity = svc->flags & NB_SVC_F_AFFINITY;
	if (affinity) {
		__u64 fold = ((__u64)(k->saddr[0] ^ k->saddr[2]) << 32) | (k->saddr[1] ^ k->saddr[3]);

		client = NB_AFF_CLIENT_ADDR | (1ULL << 62) | (fold & ((1ULL << 62) - 1));
		backend_id = nb_affinity_lookup(svc, client, rev_nat_id);
		if (backend_id) {
			be = bpf_map_lookup_elem(&nb_lb6_be, &backend_id);
			if (be) {
				nb_count(NB_CTR_AFFINITY_HIT);
				nb_svc_count(rev_nat_id, NB_SVC_AFFINITY);
			} else {
				backend_id = 0;
			}
		}
	}
	if (!backend_id) {
		if (svc->count == 0) {
			nb_count(NB_CTR_POD_NO_BACKEND);
			nb_svc_count(rev_nat_id, NB_SVC_TC_DROPPED);
			return TC_ACT_SHOT;
		}
		key.backend_slot = (__u16)(bpf_get_prandom_u32() % svc->count + 1);
		slot = bpf_map_lookup_elem(&nb_lb6_svc, &key);
		if (!slot) {
			nb_count(NB_CTR_NO_BACKEND_SLOT);
			return TC_ACT_SHOT;
		}
		backend_id = slot->backend_id;
		be = bpf_map_lookup_elem(&nb_lb6_be, &backend_id);
		if (!be) {
			nb_count(NB_CTR_BACKEND_MISSING);
			return TC_ACT_SHOT;
		}
		if (affinity) {
			nb_affinity_update(client, rev_nat_id, backend_id);
			nb_count(NB_CTR_AFFINITY_NEW);
		}
	}
	if (!be)
		return TC_ACT_OK;

	__builtin_memset(&fwd, 0, sizeof(fwd));
	nb_addr6_copy(fwd.saddr, k->saddr);
	fwd.sport = k->sport;
	nb_addr6_copy(fwd.daddr, be->address);
	fwd.dport = be->port;
	fwd.rev_nat_index = rev_nat_id;
	fwd.flags = NB_CT_F_POD;
	if (nb_np_track6(k, &fwd, tcpf, now) < 0) {
		nb_count(NB_CTR_POD_CT_FULL);
		return TC_ACT_SHOT;
	}
	nb_count(NB_CTR_POD_XLATED);
	nb_svc_count(rev_nat_id, NB_SVC_TC_NEW);
	return nb_np_rewrite6(skb, l4_off, k, &fwd);
}

static __always_inline int nb_pod_ingress6(struct __sk_buff *skb)
{
	struct nb_ct6_key k;
	struct nb_ct6_val *v;
	__u32 l4_off, now;
	__u8 tcpf;

	if (!nb_np_parse6(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = bpf_map_lookup_elem(&nb_ct6, &k);
	if (v && (!(v->flags & NB_CT_F_POD) || (v->flags & NB_CT_F_REPLY)))
		return TC_ACT_OK;
	now = nb_now_sec();
	v = nb_np_tracked6(&k, tcpf, now);
	if (v) {
		struct nb_ct6_val copy = *v;

		return nb_np_rewrite6(skb, l4_off, &k, &copy);
	}
	return __nb_pod_new6(skb, l4_off, &k, tcpf, now);
}

static __always_inline int nb_pod_egress6(struct __sk_buff *skb)
{
	struct nb_ct6_key k;
	struct nb_ct6_val *v;
	__u32 l4_off;
	__u8 tcpf;

	if (!nb_np_parse6(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = bpf_map_lookup_elem(&nb_ct6, &k);
	if (!v || (v->flags & (NB_CT_F_POD | NB_CT_F_REPLY)) != (NB_CT_F_POD | NB_CT_F_REPLY))
		return TC_ACT_OK;
	v = nb_np_tracked6(&k, tcpf, nb_now_sec());
	if (v) {
		struct nb_ct6_val copy = *v;

		nb_count(NB_CTR_POD_REPLY_XLATED);
		return nb_np_rewrite6(skb, l4_off, &k, &copy);
	}
	return TC_ACT_OK;
}

/* Packets from the pod (the host side's ingress). */
SEC("classifier")
int nb_pod_ingress(struct __sk_buff *skb)
{
	struct nb_ct4_key k;
	struct nb_ct4_val *v;
	__u32 l4_off, now;
	__u8 tcpf;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return nb_pod_ingress6(skb);
	if (!nb_np_parse(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = bpf_map_lookup_elem(&nb_ct4, &k);
	/* An external flow's reply (this pod is its backend) is rewritten on
	 * the external interface; a pod flow's reply (this pod is the
	 * backend) at the client pod's interface. */
	if (v && (!(v->flags & NB_CT_F_POD) || (v->flags & NB_CT_F_REPLY)))
		return TC_ACT_OK;
	now = nb_now_sec();
	v = nb_np_tracked(&k, tcpf, now);
	if (v) {
		struct nb_ct4_val copy = *v;

		return nb_np_rewrite(skb, l4_off, &k, &copy);
	}
	return __nb_pod_new(skb, l4_off, &k, tcpf, now);
}

/* Packets toward the pod (the host side's egress): replies get the
 * frontend back as their source. */
SEC("classifier")
int nb_pod_egress(struct __sk_buff *skb)
{
	struct nb_ct4_key k;
	struct nb_ct4_val *v;
	__u32 l4_off;
	__u8 tcpf;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return nb_pod_egress6(skb);
	if (!nb_np_parse(skb, &k, &l4_off, &tcpf))
		return TC_ACT_OK;
	v = bpf_map_lookup_elem(&nb_ct4, &k);
	if (!v || (v->flags & (NB_CT_F_POD | NB_CT_F_REPLY)) != (NB_CT_F_POD | NB_CT_F_REPLY))
		return TC_ACT_OK;
	v = nb_np_tracked(&k, tcpf, nb_now_sec());
	if (v) {
		struct nb_ct4_val copy = *v;

		nb_count(NB_CTR_POD_REPLY_XLATED);
		return nb_np_rewrite(skb, l4_off, &k, &copy);
	}
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
