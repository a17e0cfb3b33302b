/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * netboot socket load balancer: the ONE definition of every BPF map layout.
 *
 * The Rust side (datapath/src/layout.rs) mirrors each struct with #[repr(C)]
 * and compile-time size/offset asserts; change a field here, then there.
 * All structs are padded explicitly so that no implicit padding (which the
 * kernel hashes as part of a key) can hold garbage.
 *
 * Design after Cilium's lb4 maps (bpf/lib/lb.h):
 *   nb_lb4_svc      (vip, dport, proto, slot) -> frontend (slot 0) / backend id (slot 1..n,
 *                   IPv4: with the backend's address and port)
 *   nb_lb4_be       backend id -> (ip, port, proto, state)
 *   nb_lb4_revnat   rev-nat id (= service id) -> (vip, port)
 *   nb_lb4_rev_sk   (socket cookie, backend ip, port) -> (vip, port, rev-nat id)   LRU
 *   nb_lb4_aff      (client netns cookie, rev-nat id) -> (last used, backend id)  LRU
 *   nb_lb4_affmatch (backend id, rev-nat id) -> membership, kept for ready AND
 *                   terminating backends so existing affinity survives termination;
 *                   written only for frontends with ClientIP affinity (the only
 *                   reader is the affinity lookup)
 *   nb_counters     per-CPU u64 per outcome (enum nb_counter)
 *   nb_config       single entry: datapath mode (replace or observe), the host
 *                   netns cookie and whether socket LB serves only that netns
 *   nb_svc_stats    service id -> per-CPU struct nb_svc_stats (per-Service counters)
 *
 * IPv6 (after Cilium's lb6 maps): separate maps with 16-byte addresses, the
 * values that hold no address are shared with lb4:
 *   nb_lb6_svc      (vip6, dport, proto, slot) -> struct nb_lb4_service
 *   nb_lb6_be       backend id -> (ip6, port, proto, state)
 *   nb_lb6_revnat   rev-nat id -> (vip6, port)
 *   nb_lb6_rev_sk   (socket cookie, backend ip6, port) -> (vip6, port, rev-nat id)  LRU
 * Service ids (rev-nat ids) and backend ids are ONE id space over both
 * families (the reconciler allocates them), so nb_lb4_aff and
 * nb_lb4_affmatch, keyed by ids and the client's netns cookie, serve IPv6
 * frontends too: a backend id is either in nb_lb4_be or in nb_lb6_be.
 * Affinity is keyed by the client's netns cookie for both families (the
 * socket LB acts before a source address is chosen; a pod is its netns).
 *
 * IPv4-mapped destinations (::ffff:a.b.c.d) on AF_INET6 sockets are served
 * by the v4 maps: connect6/sendmsg6/recvmsg6/getpeername6 translate them
 * exactly like connect4 & co and write a v4-mapped backend address back.
 *
 *   nb_sock_term    (backend ip as 16 bytes, port, proto) -> 0: backends just
 *                   removed; the iter/udp program (sock_term.bpf.c) destroys
 *                   the connected UDP sockets whose peer is one of them.
 *                   IPv4 backends are stored v4-mapped (::ffff:a.b.c.d).
 *
 * Byte order: addresses and ports are network order (__be32/__be16), exactly as
 * they appear in struct bpf_sock_addr; everything else is host order.
 */
#ifndef NETBOOT_LB_H
#define NETBOOT_LB_H

#include <linux/types.h>

/* Map names (at most 15 characters; also the pin file names, see pins.rs). */
#define NB_MAP_SERVICES   nb_lb4_svc
#define NB_MAP_BACKENDS   nb_lb4_be
#define NB_MAP_REVNAT     nb_lb4_revnat
#define NB_MAP_REV_SK     nb_lb4_rev_sk
#define NB_MAP_AFFINITY   nb_lb4_aff
#define NB_MAP_AFF_MATCH  nb_lb4_affmatch
#define NB_MAP_COUNTERS   nb_counters
#define NB_MAP_CONFIG     nb_config
#define NB_MAP_SERVICES6  nb_lb6_svc
#define NB_MAP_BACKENDS6  nb_lb6_be
#define NB_MAP_REVNAT6    nb_lb6_revnat
#define NB_MAP_REV_SK6    nb_lb6_rev_sk
#define NB_MAP_SOCK_TERM  nb_sock_term
#define NB_MAP_CT4        nb_ct4
#define NB_MAP_NP_DEV     nb_np_dev
#define NB_MAP_MAGLEV     nb_lb4_maglev
#define NB_MAP_SRC_RANGE  nb_lb4_src_range
#define NB_MAP_CT_TIMEOUT nb_ct_timeout
#define NB_MAP_CT6        nb_ct6
#define NB_MAP_NP_DEV6    nb_np_dev6
#define NB_MAP_SRC_RANGE6 nb_lb6_src_range
#define NB_MAP_FLOW_RING  nb_flow_ring
#define NB_MAP_FLOW_CFG   nb_flow_cfg
#define NB_MAP_FLOW_RL    nb_flow_rl
#define NB_MAP_FLOW_STATS nb_flow_stats
#define NB_MAP_SVC_STATS  nb_svc_stats

/* Default sizes; the agent overrides them from config.yaml before load. */
#define NB_DEFAULT_SERVICES  65536
#define NB_DEFAULT_BACKENDS  262144
#define NB_DEFAULT_REVNAT    65536
#define NB_DEFAULT_AFFINITY  65536
#define NB_DEFAULT_REV_SK    262144
#define NB_REV_TCP_SLOTS     262144  /* nb_rev_tcp: a power of two, fixed (not in mapSizes) */
#define NB_DEFAULT_CT4       65536   /* nb_ct4: 2 entries per north-south flow */
/* Flow lifetimes (seconds) of nb_ct4 when nb_ct_timeout holds 0: kube-proxy's
 * conntrack defaults for established TCP and Cilium's for the rest. */
#define NB_CT_TCP_SYN_DEFAULT    60     /* TCP until a packet that is not a bare SYN */
#define NB_CT_TCP_EST_DEFAULT    86400  /* TCP established */
#define NB_CT_TCP_CLOSE_DEFAULT  10     /* TCP after a FIN or RST in either direction */
#define NB_CT_UDP_DEFAULT        60     /* UDP, since the last packet either way */
#define NB_DEFAULT_NP_DEV    64      /* nb_np_dev: external interfaces */
#define NB_DEFAULT_MAGLEV    4096    /* nb_lb4_maglev: external frontends with a table */
#define NB_MAGLEV_MAX        16381   /* largest Maglev table (entries), a prime */
#define NB_DEFAULT_SRC_RANGE 16384   /* nb_lb4_src_range, nb_lb6_src_range: (LB frontend, CIDR) pairs */
#define NB_DEFAULT_CT6       65536   /* nb_ct6: 2 entries per IPv6 north-south flow */

/* Frontend flags (struct nb_lb4_service.flags, slot 0 only). */
#define NB_SVC_F_AFFINITY  0x01 /* ClientIP session affinity */
#define NB_SVC_F_EXTERNAL  0x02 /* NodePort / externalIP / LB IP: the tc path serves it */
#define NB_SVC_F_EXT_LOCAL 0x04 /* externalTrafficPolicy: Local: the tc path uses
                                   slots 1..local_count only, never SNATs */
#define NB_SVC_F_SRC_RANGE 0x08 /* an LB IP of a Service with loadBalancerSourceRanges:
                                   the tc path admits new flows only from a source in
                                   nb_lb4_src_range; socket LB leaves it untranslated */

/* Backend states (struct nb_lb4_backend.state). */
#define NB_BE_ACTIVE       0 /* ready: may be chosen for new connections */
#define NB_BE_TERMINATING  1 /* terminating: only reachable through existing affinity */

/* Datapath modes (struct nb_config.mode). */
#define NB_MODE_OBSERVE    0 /* coexist: look up and count, never translate */
#define NB_MODE_REPLACE    1 /* kube-proxy replacement: translate */

/* Key of nb_lb4_svc. 12 bytes. */
struct nb_lb4_key {
	__be32 address;      /* service VIP (ClusterIP) */
	__be16 dport;        /* service port */
	__u16 backend_slot;  /* 0 = frontend entry, 1..count = backend slots */
	__u8 proto;          /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];         /* always zero */
};

/* Value of nb_lb4_svc. 20 bytes.
 *
 * A slot (> 0) of an IPv4 frontend also carries its backend's address and
 * port (backend_addr, backend_port: unions with fields only slot 0 uses, as
 * Cilium's lb4_service overlays backend_id and affinity_timeout), so
 * connect() translates with the two lookups in nb_lb4_svc and none in
 * nb_lb4_be. The copy is taken from the same element as backend_id, and a
 * backend id never changes its address while a slot names it, so the two
 * agree. backend_addr 0 (a slot written before this field, an IPv6 slot):
 * the socket LB looks the backend up in nb_lb4_be as before; the agent
 * rewrites such an IPv4 slot at its first pass. */
struct nb_lb4_service {
	__u32 backend_id;        /* slot > 0: id into nb_lb4_be; slot 0: 0 */
	union {
		__u32 affinity_timeout;  /* slot 0: ClientIP affinity timeout in seconds */
		__be32 backend_addr;     /* slot > 0, IPv4: nb_lb4_be[backend_id].address */
	};
	__u32 rev_nat_index;     /* service id (frontend id), key of nb_lb4_revnat */
	union {
		__u16 count;             /* slot 0: number of backend slots (ready backends) */
		__be16 backend_port;     /* slot > 0, IPv4: nb_lb4_be[backend_id].port */
	};
	__u16 local_count;       /* slot 0, NB_SVC_F_EXTERNAL: slots 1..local_count hold
	                            the backends on this node (local ones come first) */
	__u8 flags;              /* slot 0: NB_SVC_F_* */
	__u8 pad[3];             /* always zero */
};

/* Value of nb_lb4_be (key: __u32 backend id, 0 is never used). 8 bytes. */
struct nb_lb4_backend {
	__be32 address;  /* backend (pod) IPv4 address */
	__be16 port;     /* backend target port */
	__u8 proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 state;      /* NB_BE_* */
};

/* Value of nb_lb4_revnat (key: __u32 rev-nat id). 8 bytes. */
struct nb_lb4_reverse_nat {
	__be32 address;  /* service VIP */
	__be16 port;     /* service port */
	__u16 pad;       /* always zero */
};

/* Key of nb_lb4_rev_sk: which backend a socket was sent to. 16 bytes. */
struct nb_lb4_rev_sk_key {
	__u64 cookie;    /* socket cookie (bpf_get_socket_cookie) */
	__be32 address;  /* backend address the socket was translated to */
	__be16 port;     /* backend port */
	__u16 pad;       /* always zero */
};

/* Value of nb_lb4_rev_sk: what the socket asked for. 8 bytes. */
struct nb_lb4_rev_sk_val {
	__be32 address;       /* service VIP */
	__be16 port;          /* service port */
	__u16 rev_nat_tag;    /* low 16 bits of the service id: the service at
	                         address:port still being the one the socket was
	                         sent to (a recreated one with the same tag is
	                         the same VIP:port, so translating to it is right
	                         anyway). 16 bits keep layout 3's bytes: the map
	                         is shared across a layout upgrade (upgrade.rs) */
};

/* Value of nb_rev_tcp (key: __u32 slot = socket cookie & (NB_REV_TCP_SLOTS -
 * 1)): what a TCP socket the socket LB translated asked for, both families.
 * 48 bytes.
 *
 * Why not nb_lb4_rev_sk: a hash map keyed by a new socket's cookie lands in a
 * cold bucket of a multi-MiB table on every connect; that cache and TLB miss
 * was ~400 of the ~550 ns the connect4 program took (kernel BPF statistics,
 * netboot-bench flows). Cookies are handed out in per-CPU runs, so a CPU's
 * new sockets take neighbouring slots here, in cache. A TCP socket has one
 * peer, so one slot suffices; a later socket whose cookie falls on the same
 * slot replaces the entry (as an LRU eviction would), and getpeername then
 * returns the backend. UDP sockets (one per peer and message) keep the LRU
 * maps. */
struct nb_rev_tcp {
	__u64 cookie;          /* the socket's cookie; 0: empty */
	__be32 backend[4];     /* backend address the socket was sent to (IPv4: [0]) */
	__be32 vip[4];         /* what it asked for (IPv4: [0]) */
	__be16 backend_port;
	__be16 vport;
	__u16 rev_nat_tag;     /* as nb_lb4_rev_sk_val's */
	__u8 family;           /* 4 (also for IPv4-mapped sockets) or 6 */
	__u8 pad;              /* always zero */
};

/* Key of nb_lb4_aff. 16 bytes. */
struct nb_lb4_affinity_key {
	__u64 client_cookie;  /* client identity: netns cookie of the socket */
	__u32 rev_nat_id;     /* service id */
	__u32 pad;            /* always zero */
};

/* Value of nb_lb4_aff. 16 bytes. */
struct nb_lb4_affinity_val {
	__u64 last_used;   /* bpf_ktime_get_ns() of the last connection */
	__u32 backend_id;  /* backend chosen for this client */
	__u32 pad;         /* always zero */
};

/* Key of nb_lb4_affmatch (value: __u32 NB_BE_* state). 8 bytes. */
struct nb_lb4_affinity_match {
	__u32 backend_id;  /* backend id */
	__u32 rev_nat_id;  /* service id the backend belongs to */
};

/* nb_config.flags */
#define NB_CFG_F_HOST_NS_ONLY 0x01 /* socketLB.hostNamespaceOnly: the cgroup hooks leave
                                      sockets of other netns (pods) alone; the pod
                                      interfaces' tc programs translate their packets */

/* Value of nb_config (array, key 0). 24 bytes. Rewritten by every agent start
 * (the loader rebuilds it when an older, smaller layout is pinned). */
struct nb_config {
	__u32 mode;          /* NB_MODE_* */
	__u32 version;       /* datapath layout version the maps were written with */
	__u64 host_netns;    /* netns cookie of the agent's (the host's) netns */
	__u32 flags;         /* NB_CFG_F_* */
	__u32 pad;           /* always zero */
};

/* Key of nb_lb6_svc (value: struct nb_lb4_service). 24 bytes. */
struct nb_lb6_key {
	__be32 address[4];   /* service VIP (IPv6 ClusterIP), as in bpf_sock_addr.user_ip6 */
	__be16 dport;        /* service port */
	__u16 backend_slot;  /* 0 = frontend entry, 1..count = backend slots */
	__u8 proto;          /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];         /* always zero */
};

/* Value of nb_lb6_be (key: __u32 backend id, never also in nb_lb4_be). 20 bytes. */
struct nb_lb6_backend {
	__be32 address[4];  /* backend (pod) IPv6 address */
	__be16 port;        /* backend target port */
	__u8 proto;         /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 state;         /* NB_BE_* */
};

/* Value of nb_lb6_revnat (key: __u32 rev-nat id). 20 bytes. */
struct nb_lb6_reverse_nat {
	__be32 address[4];  /* service VIP */
	__be16 port;        /* service port */
	__u16 pad;          /* always zero */
};

/* Key of nb_lb6_rev_sk: which backend a socket was sent to. 32 bytes. */
struct nb_lb6_rev_sk_key {
	__u64 cookie;        /* socket cookie (bpf_get_socket_cookie) */
	__be32 address[4];   /* backend address the socket was translated to */
	__be16 port;         /* backend port */
	__u16 pad;           /* always zero */
	__u32 pad2;          /* always zero */
};

/* Value of nb_lb6_rev_sk: what the socket asked for. 20 bytes. */
struct nb_lb6_rev_sk_val {
	__be32 address[4];    /* service VIP */
	__be16 port;          /* service port */
	__u16 rev_nat_tag;    /* low 16 bits of the service id (as nb_lb4_rev_sk_val) */
};

/* Key of nb_sock_term (value: __u32, unused). 20 bytes. */
struct nb_sock_term_key {
	__be32 address[4];  /* removed backend; IPv4 as ::ffff:a.b.c.d */
	__be16 port;        /* its port */
	__u8 proto;         /* IPPROTO_UDP (the only protocol terminated) */
	__u8 pad;           /* always zero */
};

/* One record the iterator writes per destroyed socket. 64 bytes. Not a map
 * value (the iterator's output, read once by the agent that ran it), so it
 * may grow without a layout version. */
struct nb_sock_term_rec {
	__be32 address[4];  /* the socket's peer (a removed backend), v4-mapped for IPv4 */
	__be16 port;        /* peer port */
	__u16 family;       /* AF_INET or AF_INET6: the socket's family */
	__s32 result;       /* bpf_sock_destroy() return: 0 or -errno */
	__u64 cookie;       /* socket cookie */
	__u64 cgroup_id;    /* the socket's cgroup v2 id (its owner: the client pod) */
	__be32 vip[4];      /* the frontend it asked for (its reverse entry), v4-mapped for IPv4 */
	__be16 vport;       /* its port */
	__u16 pad;          /* always zero */
	__u32 pad2;         /* always zero */
};

/*
 * Per-packet path for traffic from outside the node (nodeport.bpf.c section
 * of sock_lb.bpf.c): a connection-tracking table of address rewrites, two
 * entries per flow, each keyed by the tuple as it appears on the wire:
 *   forward  (client -> frontend)           => (client or node IP -> backend)
 *   reply    (backend -> client or node IP) => (frontend -> client)
 */

/* Key of nb_ct4. 16 bytes. */
struct nb_ct4_key {
	__be32 saddr;   /* source address on the wire */
	__be32 daddr;   /* destination address on the wire */
	__be16 sport;   /* source port */
	__be16 dport;   /* destination port */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];    /* always zero */
};

/* Value of nb_ct4: the tuple to write, and how long the entry lives. 24 bytes.
 * An entry whose expiry has passed is treated as absent (and replaced by the
 * next flow that needs its key); the agent also deletes lapsed entries. */
struct nb_ct4_val {
	__be32 saddr;          /* new source address */
	__be32 daddr;          /* new destination address */
	__be16 sport;          /* new source port */
	__be16 dport;          /* new destination port */
	__u32 rev_nat_index;   /* service id of the flow */
	__u32 expires;         /* CLOCK_MONOTONIC second after which the entry is lapsed */
	__u8 flags;            /* NB_CT_F_* */
	__u8 pad[3];           /* always zero */
};

#define NB_CT_F_REPLY   0x01 /* reply direction entry */
#define NB_CT_F_SNAT    0x02 /* the flow is source-NATed to the node's address */
#define NB_CT_F_CLOSING 0x04 /* TCP: a FIN or RST was seen (either direction) */
#define NB_CT_F_POD     0x08 /* a pod's flow to a Service (pod interface tc path,
                                socketLB.hostNamespaceOnly): DNAT only; the forward
                                entry applies at the pod interface's ingress, the
                                reply entry at the client pod interface's egress */

/* Value of nb_ct_timeout (array, key 0): nb_ct4's lifetimes in seconds,
 * written by the agent from config.yaml's `conntrack`; 0 = the default. 16 bytes. */
struct nb_ct_timeouts {
	__u32 tcp_syn;     /* NB_CT_TCP_SYN_DEFAULT */
	__u32 tcp_est;     /* NB_CT_TCP_EST_DEFAULT */
	__u32 tcp_close;   /* NB_CT_TCP_CLOSE_DEFAULT */
	__u32 udp;         /* NB_CT_UDP_DEFAULT */
};

/* Value of nb_np_dev (key: __u32 ifindex of an external interface). 8 bytes. */
struct nb_np_dev {
	__be32 snat_addr;  /* the node's IPv4 address remote backends see (SNAT) */
	__u32 pad;         /* always zero */
};

/* Value of nb_lb4_maglev (key: __u32 rev-nat id of an external frontend).
 * 32768 bytes. Built in userspace (src/maglev.rs) when loadBalancing is
 * maglev: a new flow of the per-packet path takes
 * slot[hash(saddr, sport, dport, proto) % size], a backend slot 1..n of
 * the frontend (n = local_count under externalTrafficPolicy Local, else
 * count). No entry, or a slot out of range: a random slot as without. */
struct nb_maglev {
	__u32 size;                  /* entries used, a prime <= NB_MAGLEV_MAX; 0 = none */
	__u16 slot[NB_MAGLEV_MAX];   /* backend slot numbers (1-based) */
	__u16 pad;                   /* always zero */
};

/* Key of nb_lb4_src_range (LPM trie): an allowed source CIDR of one LB IP
 * frontend. prefixlen counts the bits after it: 32 (the frontend's
 * rev_nat_index, matched whole) + the CIDR's mask length. 12 bytes. */
struct nb_src_range_key {
	__u32 prefixlen;
	__u32 rev_nat_index;   /* host order, as in nb_lb4_service */
	__be32 addr;           /* network order */
};

/* IPv6 twins of the per-packet path's maps (same semantics, 16-byte addresses). */

/* Key of nb_ct6. 40 bytes. */
struct nb_ct6_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];    /* always zero */
};

/* Value of nb_ct6. 48 bytes. */
struct nb_ct6_val {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u32 rev_nat_index;
	__u32 expires;         /* CLOCK_MONOTONIC second after which the entry is lapsed */
	__u8 flags;            /* NB_CT_F_* */
	__u8 pad[3];           /* always zero */
};

/* Value of nb_np_dev6 (key: __u32 ifindex). 16 bytes. */
struct nb_np_dev6 {
	__be32 snat_addr[4];   /* the node's IPv6 address remote backends see (SNAT) */
};

/* Key of nb_lb6_src_range (LPM trie): as nb_src_range_key with an IPv6
 * CIDR; prefixlen = 32 + the CIDR's mask length. 24 bytes. */
struct nb_src_range6_key {
	__u32 prefixlen;
	__u32 rev_nat_index;   /* host order */
	__be32 addr[4];        /* network order */
};

/* bpf_sock_destroy() is a kfunc; aya 0.14 cannot relocate kfunc calls, so
 * sock_term.bpf.c calls this placeholder helper id and the loader
 * (src/sock_term.rs) rewrites that call into a kfunc call before loading. */
#define NB_KFUNC_SOCK_DESTROY_MARKER 0x7e57d0

/*
 * Service flow events (after Hubble's flow records / Cilium's trace
 * events): connect4/6 and sendmsg4/6 write one struct nb_flow_event to the
 * nb_flow_ring ring buffer per decision on a Service address, when
 * nb_flow_cfg.enabled is set (the agent sets it only while someone watches:
 * `netboot-datapath monitor`, GET /v1/flows). Each CPU spends at most
 * nb_flow_cfg.rate events per second (token bucket in nb_flow_rl, burst =
 * one second's budget); what does not fit is counted in nb_flow_stats.
 *
 *   nb_flow_ring   ring buffer, NB_FLOW_RING_BYTES
 *   nb_flow_cfg    array, key 0: struct nb_flow_cfg
 *   nb_flow_rl     per-CPU array, key 0: struct nb_flow_bucket
 *   nb_flow_stats  per-CPU array of __u64, index enum nb_flow_stat
 */
#define NB_FLOW_RING_BYTES   (1 << 20)  /* 1 MiB: ~13,000 events */
#define NB_FLOW_RATE_DEFAULT 10000      /* events per second per CPU when rate is 0 */
#define NB_FLOW_WAKE_BYTES   (64 << 10) /* wake the reader once this much is unread; it
                                           also drains on its own every 50 ms (flows.rs):
                                           a wakeup per event cost every connection a
                                           context switch on a busy node */

/* Verdicts (struct nb_flow_event.verdict). */
#define NB_FLOW_TRANSLATED   1 /* translated to a backend chosen now */
#define NB_FLOW_AFFINITY_HIT 2 /* translated to the backend of a ClientIP affinity entry */
#define NB_FLOW_REFUSED      3 /* no usable backend: the syscall fails ECONNREFUSED */
#define NB_FLOW_ERROR        4 /* reverse entry not recorded: the syscall fails ENOMEM */
#define NB_FLOW_OBSERVED     5 /* coexist (observe) mode: looked up, not translated */
#define NB_FLOW_SRC_RANGE    6 /* LB IP with source ranges: left to the per-packet path */
#define NB_FLOW_DENIED       7 /* per-packet path: dropped, the client is outside the
                                  Service's loadBalancerSourceRanges */
/* 8 (terminated: a connected UDP socket destroyed because its backend went) is
 * the agent's own, from the sock_term iterator's records, never the kernel's. */
/* Only while nb_flow_cfg.enabled has NB_FLOW_CFG_ALL (a watcher asked for them):
 * socket decisions about destinations that are no Service. */
#define NB_FLOW_NOT_SERVICE  9 /* the destination is no Service: left alone */
#define NB_FLOW_UNSUPPORTED  10 /* neither TCP nor UDP: not looked up */

/* nb_flow_cfg.enabled bits. */
#define NB_FLOW_CFG_ON       0x1 /* decisions on Service addresses */
#define NB_FLOW_CFG_ALL      0x2 /* also not-a-service and unsupported ones */

/* Hooks (struct nb_flow_event.hook). */
#define NB_FLOW_HOOK_CONNECT 1 /* connect4 / connect6 */
#define NB_FLOW_HOOK_SENDMSG 2 /* sendmsg4 / sendmsg6 */
#define NB_FLOW_HOOK_PACKET  3 /* the per-packet (tc) path: a new external flow */

/* Value of nb_flow_cfg (array, key 0). 8 bytes. */
struct nb_flow_cfg {
	__u32 enabled;  /* 0: no events (the default); NB_FLOW_CFG_* bits */
	__u32 rate;     /* events per second per CPU; 0 = NB_FLOW_RATE_DEFAULT */
};

/* Value of nb_flow_rl (per-CPU array, key 0): the token bucket. 16 bytes.
 * Tokens are kept in token-nanoseconds (one event costs 1e9), so refilling
 * needs no division: tokens += elapsed_ns * rate, capped at rate * 1e9. */
struct nb_flow_bucket {
	__u64 tokens;   /* token-ns available */
	__u64 last_ns;  /* bpf_ktime_get_ns() of the last refill */
};

/* Index of nb_flow_stats (per-CPU array of __u64). */
enum nb_flow_stat {
	NB_FLOW_STAT_EMITTED = 0,  /* events written to the ring buffer */
	NB_FLOW_STAT_RATE_LIMITED, /* events not written: over the per-CPU budget */
	NB_FLOW_STAT_RING_FULL,    /* events not written: ring buffer full (reader behind) */
	NB_FLOW_STAT_MAX
};

/* One record of nb_flow_ring. 104 bytes. Addresses and ports in network
 * order; IPv4 (and IPv4-mapped destinations) in vip[0] / backend[0] /
 * client[0] with family 4. Socket hooks know the client by its netns and
 * cgroup (client[] zero: not bound yet); the per-packet path by its address
 * (netns_cookie, cgroup_id zero: no local socket). */
struct nb_flow_event {
	__u64 ts_ns;          /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 netns_cookie;   /* client's network namespace cookie */
	__u64 cgroup_id;      /* client's cgroup v2 id (bpf_get_current_cgroup_id) */
	__be32 vip[4];        /* frontend address the client asked for */
	__be32 backend[4];    /* chosen backend address; zero when none */
	__u32 backend_id;     /* chosen backend id; 0 = none */
	__u32 outcome;        /* enum nb_counter: the precise reason */
	__u32 svc_id;         /* service id (rev-nat id) */
	__be16 vport;         /* frontend port */
	__be16 backend_port;  /* chosen backend port; 0 when none */
	__u8 proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;          /* 4 or 6 */
	__u8 verdict;         /* NB_FLOW_* */
	__u8 hook;            /* NB_FLOW_HOOK_* */
	__u32 pad;            /* always zero */
	__be32 client[4];     /* per-packet path: the client's address; else zero */
	__be16 client_port;   /* per-packet path: the client's port; else zero */
	__u16 pad2;           /* always zero */
	__u32 pad3;           /* always zero */
};

/*
 * Per-Service counters (issue 19): nb_svc_stats, a per-CPU hash keyed by
 * __u32 service id (rev-nat id, so per frontend address:port:proto), value
 * struct nb_svc_stats. Sized like nb_lb4_revnat (mapSizes.reverseNat: one
 * entry per live service id at most).
 *
 * BPF_MAP_TYPE_PERCPU_HASH with BPF_F_NO_PREALLOC (decision): memory only
 * for the Services that saw traffic (a preallocated or LRU per-CPU hash
 * would take reverseNat x CPUs x 40 bytes at load, 168 MB with the
 * defaults on 64 CPUs); LRU is not needed because the map cannot fill: it
 * holds at most one entry per id the reconciler allocated, and the agent
 * deletes an id's entry before it gives the id to a new frontend. Updates
 * are best effort: a failed update (ENOMEM, E2BIG) loses one count and
 * never fails the connection.
 */
/* Value of nb_svc_stats (per-CPU hash, key: __u32 service id). 40 bytes.
 * Userspace sums the CPUs. */
struct nb_svc_stats {
	__u64 xlated;     /* socket LB: connect()/sendmsg() translated to a backend
	                     (affinity hits included) */
	__u64 refused;    /* socket LB: no usable backend, failed ECONNREFUSED */
	__u64 affinity;   /* socket LB and pod tc path: backend taken from a
	                     ClientIP affinity entry */
	__u64 tc_new;     /* tc paths (NodePort, pod interfaces): new flows translated */
	__u64 tc_dropped; /* tc paths: new flows dropped for want of a (local) backend */
};

/* Layout version: bump when any struct above changes incompatibly. */
#define NB_LAYOUT_VERSION 4

/* Index of nb_counters (per-CPU array of __u64). One per outcome. */
enum nb_counter {
	NB_CTR_CONNECT_XLATED = 0,    /* connect4: translated to a backend */
	NB_CTR_SENDMSG_XLATED,        /* sendmsg4: translated to a backend */
	NB_CTR_NOT_SERVICE,           /* connect4/sendmsg4: destination is no service */
	NB_CTR_PROTO_UNSUPPORTED,     /* connect4/sendmsg4: neither TCP nor UDP */
	NB_CTR_NO_BACKEND,            /* service without ready backend: rejected ECONNREFUSED */
	NB_CTR_NO_BACKEND_SLOT,       /* slot missing (update in flight): rejected ECONNREFUSED */
	NB_CTR_BACKEND_MISSING,       /* slot names an unknown backend id: rejected ECONNREFUSED */
	NB_CTR_AFFINITY_HIT,          /* affinity entry reused */
	NB_CTR_AFFINITY_NEW,          /* affinity entry created or refreshed with a new backend */
	NB_CTR_AFFINITY_EXPIRED,      /* affinity entry older than the timeout */
	NB_CTR_AFFINITY_STALE,        /* affinity backend no longer belongs to the service */
	NB_CTR_REV_SK_UPDATE_FAIL,    /* could not record the reverse entry: rejected ENOMEM */
	NB_CTR_RECVMSG_XLATED,        /* recvmsg4: source rewritten to the VIP */
	NB_CTR_RECVMSG_NO_ENTRY,      /* recvmsg4: no reverse entry for this socket/peer */
	NB_CTR_PEER_XLATED,           /* getpeername4: peer rewritten to the VIP */
	NB_CTR_PEER_NO_ENTRY,         /* getpeername4: no reverse entry */
	NB_CTR_REV_STALE,             /* recvmsg4/getpeername4: service is gone, entry dropped */
	NB_CTR_OBSERVED,              /* observe mode: a service was hit but not translated */
	NB_CTR_NO_CONFIG,             /* nb_config unreadable: nothing done */
	NB_CTR_NP_LOCAL,              /* tc: new external flow DNATed to a local backend */
	NB_CTR_NP_SNAT,               /* tc: new external flow DNATed + SNATed to a remote backend */
	NB_CTR_NP_CT_HIT,             /* tc: packet of a tracked flow rewritten (either direction) */
	NB_CTR_NP_NO_BACKEND,         /* tc: external frontend without backend: dropped */
	NB_CTR_NP_NO_LOCAL_BACKEND,   /* tc: externalTrafficPolicy Local, none here: dropped */
	NB_CTR_NP_NO_SNAT_ADDR,       /* tc: interface not in nb_np_dev: dropped */
	NB_CTR_NP_CT_FULL,            /* tc: no free SNAT port / CT update failed: dropped */
	NB_CTR_NP_NOT_SERVICE,        /* tc: not an external frontend: passed */
	NB_CTR_NP_MAGLEV,             /* tc: new flow's slot taken from the Maglev table */
	NB_CTR_NP_SRC_RANGE_DENIED,   /* tc: LB IP flow from outside its source ranges: dropped */
	NB_CTR_SRC_RANGE_PASSED,      /* socket LB: LB IP with source ranges: not translated */
	NB_CTR_NP_CT_LAPSED,          /* tc: a tracked entry past its lifetime: treated as absent */
	NB_CTR_NP_CT_REOPENED,        /* tc: a bare SYN on a closing flow: chosen anew */
	NB_CTR_NP_CT_REPLACED,        /* tc: a new flow took over a lapsed or closed flow's reply key */
	NB_CTR_NP_CT_CLASH,           /* tc: the reply tuple belongs to a live flow: dropped */
	NB_CTR_SOCK_POD_NS,           /* socket LB, hostNamespaceOnly: a Service from a socket
	                                 outside the host netns: left to the pod interface */
	NB_CTR_POD_XLATED,            /* tc pod: a pod's new flow to a Service DNATed */
	NB_CTR_POD_REPLY_XLATED,      /* tc pod: a reply rewritten to the Service toward the pod */
	NB_CTR_POD_NO_BACKEND,        /* tc pod: Service without backend: dropped */
	NB_CTR_POD_CT_FULL,           /* tc pod: tracking failed (full, or a live tuple clash): dropped */
	NB_CTR_MAX                    /* number of counters (array size) */
};

#endif /* NETBOOT_LB_H */
