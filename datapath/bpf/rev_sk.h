/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * The socket LB's reverse entries, declared once for the two objects that
 * use them: sock_lb.bpf.c writes them (connect/sendmsg) and reads them
 * (recvmsg/getpeername); sock_term.bpf.c reads them to destroy only the
 * sockets the socket LB sent to a removed backend. Both objects open the
 * same pinned maps (loader.rs, sock_term.rs).
 */
#ifndef NETBOOT_REV_SK_H
#define NETBOOT_REV_SK_H

#include "lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_REV_SK);
	__type(key, struct nb_lb4_rev_sk_key);
	__type(value, struct nb_lb4_rev_sk_val);
} nb_lb4_rev_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NB_DEFAULT_REV_SK);
	__type(key, struct nb_lb6_rev_sk_key);
	__type(value, struct nb_lb6_rev_sk_val);
} nb_lb6_rev_sk SEC(".maps");

#endif /* NETBOOT_REV_SK_H */
