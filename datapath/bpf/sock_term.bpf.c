// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * netboot socket termination: destroys the connected UDP sockets whose peer
 * is a backend that was just removed, so the application sees ECONNABORTED
 * and reconnects (through the socket LB) to a live backend. TCP needs no
 * help: the backend's RST or timeouts end it. After Cilium's
 * sock_terminate.c, written for this datapath.
 *
 * The agent writes the removed backends into nb_sock_term and reads the
 * iterator once per network namespace (the udp iterator walks the sockets
 * of the netns it was created in). Only sockets in TCP_ESTABLISHED state,
 * i.e. connect()ed UDP sockets, are candidates: an unconnected socket has
 * no peer and is left alone; and of those only the ones the socket LB sent
 * to the removed backend (their reverse entry, nb_lb4_rev_sk/nb_lb6_rev_sk). Each destroyed socket is reported as one
 * struct nb_sock_term_rec in the iterator's output.
 *
 * Needs kernel >= 6.5 (bpf_sock_destroy, batched udp iterator); the loader
 * reports "unavailable" with the reason when it cannot load this program.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"

#define NB_AF_INET        2
#define NB_AF_INET6       10
#define NB_TCP_ESTABLISHED 1

/* The kernel types read here; CO-RE relocates each field access. */
struct in6_addr {
	union {
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

/* The socket's cgroup v2: sk->sk_cgrp_data.cgroup->kn->id. */
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));

struct seq_file;
struct udp_sock;

/* The iterator context (fixed ABI: each pointer is a __bpf_md_ptr). */
struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
	__u32 uid __attribute__((aligned(8)));
	int bucket __attribute__((aligned(8)));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct nb_sock_term_key);
	__type(value, __u32);
} nb_sock_term SEC(".maps");

/* The socket LB's reverse entries, the agent's pinned maps: the loader
 * opens them from their pins (SockTerm::load), never creates them. A socket
 * is ours only if the socket LB sent it to this backend. */
#include "rev_sk.h"

/* See NB_KFUNC_SOCK_DESTROY_MARKER in lb.h. */
static long (*nb_sock_destroy)(void *sk) = (void *)NB_KFUNC_SOCK_DESTROY_MARKER;

SEC("iter/udp")
int nb_sock_term_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;
	struct nb_sock_term_key key;
	struct nb_sock_term_rec rec;
	unsigned short family;

	if (!sk)
		return 0;
	if (sk->skc_state != NB_TCP_ESTABLISHED)
		return 0; /* not connected: no peer, left alone */

	__builtin_memset(&key, 0, sizeof(key));
	family = sk->skc_family;
	if (family == NB_AF_INET) {
		key.address[2] = __builtin_bswap32(0x0000ffff);
		key.address[3] = sk->skc_daddr;
	} else if (family == NB_AF_INET6) {
		/* v4-mapped peers (AF_INET6 socket to ::ffff:a.b.c.d) are
		 * already in the key's form. */
		key.address[0] = sk->skc_v6_daddr.in6_u.u6_addr32[0];
		key.address[1] = sk->skc_v6_daddr.in6_u.u6_addr32[1];
		key.address[2] = sk->skc_v6_daddr.in6_u.u6_addr32[2];
		key.address[3] = sk->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		return 0;
	}
	key.port = sk->skc_dport;
	key.proto = IPPROTO_UDP;
	if (!bpf_map_lookup_elem(&nb_sock_term, &key))
		return 0;

	__builtin_memset(&rec, 0, sizeof(rec));
	rec.cookie = bpf_get_socket_cookie(sk);
	/* Only a socket the socket LB sent to this backend (its reverse entry
	 * says which frontend it asked for), as kube-proxy clears only the UDP
	 * conntrack entries DNATed from the Service to the endpoint: a socket
	 * connected to the pod's address itself, or one another node's socket
	 * LB translated, is left alone. */
	if (key.address[0] == 0 && key.address[1] == 0 &&
	    key.address[2] == __builtin_bswap32(0x0000ffff)) {
		struct nb_lb4_rev_sk_key rk = {
			.cookie = rec.cookie,
			.address = key.address[3],
			.port = key.port,
		};
		struct nb_lb4_rev_sk_val *rv = bpf_map_lookup_elem(&nb_lb4_rev_sk, &rk);

		if (!rv)
			return 0;
		rec.vip[2] = key.address[2];
		rec.vip[3] = rv->address;
		rec.vport = rv->port;
	} else {
		struct nb_lb6_rev_sk_key rk;
		struct nb_lb6_rev_sk_val *rv;

		__builtin_memset(&rk, 0, sizeof(rk));
		rk.cookie = rec.cookie;
		rk.address[0] = key.address[0];
		rk.address[1] = key.address[1];
		rk.address[2] = key.address[2];
		rk.address[3] = key.address[3];
		rk.port = key.port;
		rv = bpf_map_lookup_elem(&nb_lb6_rev_sk, &rk);
		if (!rv)
			return 0;
		rec.vip[0] = rv->address[0];
		rec.vip[1] = rv->address[1];
		rec.vip[2] = rv->address[2];
		rec.vip[3] = rv->address[3];
		rec.vport = rv->port;
	}
	rec.address[0] = key.address[0];
	rec.address[1] = key.address[1];
	rec.address[2] = key.address[2];
	rec.address[3] = key.address[3];
	rec.port = key.port;
	rec.family = family;
	/* Who owned it, for the agent's flow event; read before the socket is
	 * destroyed. */
	{
		struct cgroup *cg = ((struct sock *)sk)->sk_cgrp_data.cgroup;

		if (cg && cg->kn)
			rec.cgroup_id = cg->kn->id;
	}
	rec.result = (__s32)nb_sock_destroy(sk); /* the NULL-checked pointer */
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

char _license[] SEC("license") = "GPL";
