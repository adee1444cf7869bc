/* Shared by every slotscope backend: the event record, maps, pid filter,
 * per-thread MMIO exit state and the in-kernel exit histograms.
 *
 * Python defines before this file: FILTER_PIDS (0/1), USE_RINGBUF (0/1),
 * RINGBUF_PAGES, AGGREGATE (0/1), HAVE_<TRACEPOINT> for each optional
 * tracepoint.
 */

#include <uapi/linux/ptrace.h>

typedef u64 gfn_t;  /* kvmmmu formats name it; bcc has no kvm headers */

enum ev_type {
	EV_MEMSLOT = 1,   /* ns=begin ns2=end a=gpa b=size c=uaddr d=vm e=slot f=flags x=ret */
	EV_MMIO = 2,      /* ns a=gpa b=val d=vm e=type f=len x=vcpu */
	EV_FAULT = 3,     /* ns=exit ns2=entry a=gpa b=gens c=bits d=vm e=reason f=len x=vcpu */
	EV_GEN = 4,       /* ns a=gen d=vm e=source f=zap */
	EV_ZAP = 5,       /* ns a=mmu_valid_gen d=vm */
	EV_VM = 6,        /* ns d=vm (pid<<32|fd) : KVM_CREATE_VM seen */
	EV_SETMEM = 7,    /* ns=begin ns2=end a=base_gfn b=npages c=uaddr d=vm(kvm)
	                   * e=slot f=flags g=gen before h=gen after x=ret;
	                   * the change type (enum kvm_mr_change) is in f >> 24 */
};

/* Lost-event kinds: index into the per-cpu `lost` array. */
enum lost_kind { LOST_MEMSLOT, LOST_MMIO, LOST_FAULT, LOST_GEN, LOST_ZAP, LOST_VM, LOST_MAX };

struct event {
	u32 type;
	u32 pid;
	u32 tid;
	s32 x;
	u64 ns;
	u64 ns2;
	u64 a, b, c, d;
	u32 e, f;
	u64 g, h;
};

/* mmio_fault bits (event c) */
#define F_CHECKED   (1 << 0)
#define F_STALE     (1 << 1)
#define F_REMARKED  (1 << 2)
#define F_FAST_HIT  (1 << 3)
#define F_WRITE     (1 << 4)
#define F_TO_USER   (1 << 5)
#define F_ACCESS    (1 << 6)   /* kvm_mmio seen */
#define F_SYNTH     (1 << 7)   /* no kvm_exit: interval kvm_mmio -> next KVM_RUN */
#define F_UNFINISHED (1 << 8)  /* the vCPU thread exited before re-entering */
#define F_MMIO (F_CHECKED | F_REMARKED | F_FAST_HIT | F_ACCESS)

#define EXIT_REASON_NONE 0xffffffff

/* What every tracepoint program returns, on every path.  The kernel runs a
 * BPF program on a tracepoint as a filter for all perf users of that
 * tracepoint: a 0 drops the event for every other perf event on it
 * (perf_trace_run_bpf_submit), so `perf record -e kvm:kvm_mmio` or
 * `perf kvm stat` beside slotscope would silently see nothing.  1 passes the
 * event on.  kprobe programs keep 0: bcc's kprobe event is its own, not shared
 * with other tools; fentry/fexit must return 0 (the verifier says so). */
#define TP_KEEP 1

#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif
BPF_PERCPU_ARRAY(lost, u64, LOST_MAX);
BPF_HASH(pids, u32, u8, 256);

/* vCPU identity per thread, learnt from KVM_CREATE_VCPU + KVM_RUN or kvm_entry. */
struct vcpu_key { u32 pid; u32 fd; };
struct vcpu_info { u64 vm; s32 vcpu; u32 pad; };
/* LRU: threads and fds of processes that died must not fill the maps up. */
BPF_TABLE("lru_hash", struct vcpu_key, struct vcpu_info, vcpu_fds, 4096);
BPF_TABLE("lru_hash", u32, struct vcpu_info, tid_vcpu, 4096);

/* One vCPU exit being handled: kvm_exit (or kvm_mmio) -> kvm_entry (or KVM_RUN). */
struct exit_state {
	u64 exit_ns;
	u64 gpa;
	u32 reason;
	u32 bits;
	u32 kvm_gen;
	u32 spte_gen;
	u32 len;
	s32 vcpu;
	u64 user_ns;  /* KVM_RUN first returned to the VMM in this exit */
};
BPF_TABLE("lru_hash", u32, struct exit_state, exits, 4096);

/* A thread's entry stays in ``exits`` from its first exit on and is reused:
 * exit_ns == 0 means no exit is open.  An LRU hash update and delete per
 * exit were the dearest part of the hot path (bench/bpf_prog_cost in the
 * TCG L1: kvm_exit 31 us a run, twice kvm_entry's); a lookup and a write in
 * place are not. */
static __always_inline struct exit_state *open_exit(u32 tid)
{
	struct exit_state *st = exits.lookup(&tid);
	return st && st->exit_ns ? st : NULL;
}

/* Open an exit for ``tid``: its entry overwritten in place, or made. */
static __always_inline void begin_exit(u32 tid, struct exit_state *n)
{
	struct exit_state *st = exits.lookup(&tid);
	if (st)
		*st = *n;
	else
		exits.update(&tid, n);
}

/* Non-MMIO exits: count and total ns per (pid, reason, log2 latency). */
struct hist_key { u32 pid; u32 reason; u32 slot; u32 pad; };
struct hist_val { u64 count; u64 sum_ns; };
BPF_HASH(exit_hist, struct hist_key, struct hist_val, 8192);

#if AGGREGATE
/* Aggregation mode: MMIO intervals are counted here instead of streamed, per
 * (VM, vCPU, exit reason, SPTE evidence bits, log2 latency).  Per-CPU, so a
 * vCPU's hot path takes no shared cache line; user space sums the CPUs. */
struct mmio_hist_key { u64 vm; u32 pid; s32 vcpu; u32 reason; u16 bits; u16 slot; };
BPF_PERCPU_HASH(mmio_hist, struct mmio_hist_key, struct hist_val, 16384);
#endif

static __always_inline int traced(u32 pid)
{
#if FILTER_PIDS
	return pids.lookup(&pid) != NULL;
#else
	return 1;
#endif
}

static __always_inline void count_lost(int kind)
{
	u64 *v = lost.lookup(&kind);
	if (v)
		(*v)++;
}

static __always_inline struct event *ev_reserve(void *ctx, struct event *buf, int kind)
{
#if USE_RINGBUF
	struct event *e = events.ringbuf_reserve(sizeof(struct event));
	/* Since 6.15 the reserve lock is a resilient spinlock that can give up
	 * (timeout/deadlock check) with space left: try once more. */
	if (!e)
		e = events.ringbuf_reserve(sizeof(struct event));
	if (!e)
		count_lost(kind);
	return e;
#else
	return buf;
#endif
}

static __always_inline void ev_submit(void *ctx, struct event *e)
{
#if USE_RINGBUF
	/* No wakeup per record: user space drains in batches on a timer, so a
	 * record costs no IPI or context switch on the traced vCPU's path. */
	events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
#else
	events.perf_submit(ctx, e, sizeof(*e));
#endif
}

/* Fill the common header; the caller sets the rest and submits. */
static __always_inline void ev_init(struct event *e, u32 type, u64 id, u64 ns)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->type = type;
	e->pid = id >> 32;
	e->tid = (u32)id;
	e->ns = ns;
}

static __always_inline u64 vm_of_tid(u32 tid, u32 pid, s32 *vcpu)
{
	struct vcpu_info *vi = tid_vcpu.lookup(&tid);
	if (vi) {
		*vcpu = vi->vcpu;
		return vi->vm;
	}
	*vcpu = -1;
	return (u64)pid << 32;
}

static __always_inline u32 log2_u64(u64 v)
{
	u32 r = 0;
#pragma unroll
	for (int i = 32; i > 0; i >>= 1) {
		if (v >> i) {
			v >>= i;
			r += i;
		}
	}
	return r;
}

/* Close the open exit of `tid` at `ns`: an MMIO interval becomes an event,
 * anything else goes into the exit histogram. */
static __always_inline void close_exit(void *ctx, u64 id, struct exit_state *st, u64 ns)
{
	u32 tid = (u32)id;
	if (st->bits & F_MMIO) {
#if AGGREGATE
		struct mmio_hist_key k = {};
		s32 vcpu = st->vcpu;
		k.vm = vm_of_tid(tid, id >> 32, &vcpu);
		k.vcpu = st->vcpu >= 0 ? st->vcpu : vcpu;
		k.pid = id >> 32;
		k.reason = st->reason;
		k.bits = st->bits & 0x1ff;
		k.slot = log2_u64(ns - st->exit_ns);
		struct hist_val zero = {};
		struct hist_val *v = mmio_hist.lookup_or_try_init(&k, &zero);
		if (v) {
			v->count++;
			v->sum_ns += ns - st->exit_ns;
		} else {
			count_lost(LOST_FAULT);  /* map full: counted, never silent */
		}
#else
		struct event buf;
		struct event *e = ev_reserve(ctx, &buf, LOST_FAULT);
		if (e) {
			ev_init(e, EV_FAULT, id, st->exit_ns);
			e->ns2 = ns;
			e->a = st->gpa;
			e->b = ((u64)st->kvm_gen << 32) | st->spte_gen;
			e->c = st->bits;
			s32 vcpu = st->vcpu;
			e->d = vm_of_tid(tid, id >> 32, &vcpu);
			if (st->vcpu >= 0)
				vcpu = st->vcpu;
			e->x = vcpu;
			e->e = st->reason;
			e->f = st->len;
			ev_submit(ctx, e);
		}
#endif
	} else if (st->reason != EXIT_REASON_NONE) {
		struct hist_key k = {};
		k.pid = id >> 32;
		k.reason = st->reason;
		k.slot = log2_u64(ns - st->exit_ns);
		struct hist_val zero = {};
		struct hist_val *v = exit_hist.lookup_or_try_init(&k, &zero);
		if (v) {
			__sync_fetch_and_add(&v->count, 1);
			__sync_fetch_and_add(&v->sum_ns, ns - st->exit_ns);
		}
	}
	st->exit_ns = 0;  /* closed: the entry is reused by the next exit */
}
