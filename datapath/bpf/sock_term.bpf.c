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
 * no peer and is left alone. Each destroyed socket is reported as one
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
	rec.address[0] = key.address[0];
	rec.address[1] = key.address[1];
	rec.address[2] = key.address[2];
	rec.address[3] = key.address[3];
	rec.port = key.port;
	rec.family = family;
	rec.result = (__s32)nb_sock_destroy(sk); /* the NULL-checked pointer */
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

char _license[] SEC("license") = "GPL";
