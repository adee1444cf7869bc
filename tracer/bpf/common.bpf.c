/* Shared by every slotscope backend: the event record, maps, pid filter,
 * per-thread MMIO exit state and the in-kernel exit histograms.
 *
 * Python defines before this file: FILTER_PIDS (0/1), USE_RINGBUF (0/1),
 * RINGBUF_PAGES, AGGREGATE (0/1), HIST_SLOTS, ATOMICS (0/1: BPF atomics with fetch,
 * capabilities._atomics), HAVE_<TRACEPOINT> for each optional tracepoint.
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
enum lost_kind { LOST_MEMSLOT, LOST_MMIO, LOST_FAULT, LOST_GEN, LOST_ZAP, LOST_VM, LOST_EXIT,
		 LOST_MAX };

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

static __always_inline int traced(u32 pid)
{
#if FILTER_PIDS
	return pids.lookup(&pid) != NULL;
#else
	return 1;
#endif
}

/* vCPU identity per (pid, vCPU fd), learnt from KVM_CREATE_VCPU or seeded
 * from /proc by user space; copied into the thread's entry at its KVM_RUN. */
struct vcpu_key { u32 pid; u32 fd; };
struct vcpu_info { u64 vm; s32 vcpu; u32 pad; };
/* LRU: fds of processes that died must not fill the map up. */
BPF_TABLE("lru_hash", struct vcpu_key, struct vcpu_info, vcpu_fds, 4096);

#define HIST_WAYS 4  /* histogram keys a thread keeps (ATOMICS) */

/* Everything the hot path needs about one traced thread, in one entry: the
 * exit being handled (kvm_exit or kvm_mmio -> kvm_entry or KVM_RUN), the
 * thread's vCPU identity and whether a KVM ioctl of interest is in flight.
 * An entry exists only for threads of traced processes, so finding it is
 * also the pid filter.  In the TCG L1 every map lookup costs microseconds
 * (bench/bpf_prog_cost): a filter, an exit state and an identity map made
 * three lookups a program where this makes one.  exit_ns == 0: no exit is
 * open; the entry is reused from exit to exit and deleted when the thread
 * exits (its tid may be reused by a process that is not traced). */
struct thread {
	u64 exit_ns;
	u64 gpa;
	u64 end_ns;    /* where an unfinished exit ends (sched_process_exit):
	                * the access KVM handed to the VMM (stream mode), or
	                * KVM_RUN's return for an exit without kvm_exit */
	u32 reason;
	u32 bits;
	u32 kvm_gen;
	u32 spte_gen;
	u32 len;
	s32 exit_vcpu; /* from kvm_exit; -1 where the exit did not say */
	u64 vm;        /* pid << 32 | VM fd; 0 until KVM_RUN on a known vCPU fd */
	s32 vcpu;      /* -1 until then */
	u32 pending;   /* a KVM ioctl in flight: its arguments are in `pending` */
	u64 gen_vm;    /* the VM whose MMIO generation this thread saw last, */
	u32 gen_seen;  /* and that generation + 1 (0: none; kvm_events.bpf.c gen_seen) */
	u32 gen_pad;
#if ATOMICS
	/* The histogram keys of the thread's last exits (HIST_WAYS of them: one
	 * vCPU's exits alternate between a few, MMIO reads and writes, checked
	 * or not, and other reasons), each as (reason << 32 | bits) and its
	 * counters' first index + 1 in hist_counts; cached for the thread's VM
	 * and vCPU in hist_vm and hist_vcpu. */
	u64 hist_vm;
	s32 hist_vcpu;
	u32 hist_next;  /* the way the next new key replaces */
	u64 hist_tag[HIST_WAYS];
	u32 hist_base[HIST_WAYS];  /* 0: none */
#endif
};
/* Where a traced thread's entry lives.  Most are in a direct-mapped array,
 * at tid % THREAD_SLOTS, tagged with the tid (0: free): an array lookup is
 * inlined by the JIT and touches one page, where a hash lookup hashes the key
 * and touches its bucket, its element and the map.  kvm_exit runs first after
 * the guest exits, when in a TCG L1 every page is cold again: there the hash
 * took 1.78 us a run against 1.31 us (bench/bpf_prog_cost, the variants in
 * tracer/README.md).  Threads whose slot is taken go to the LRU hash, and
 * all of them where a slot cannot be claimed atomically (no ATOMICS). */
#define THREAD_SLOTS (ATOMICS ? 1024 : 1)
struct thread_slot {
	u64 tid;  /* 64 bits: the BPF ISA before v3 has 64-bit cmpxchg only */
	struct thread t;
};
BPF_ARRAY(thread_slots, struct thread_slot, THREAD_SLOTS);
BPF_TABLE("lru_hash", u32, struct thread, threads, 4096);

static __always_inline struct thread_slot *slot_of(u32 tid)
{
	u32 i = tid & (THREAD_SLOTS - 1);
	return thread_slots.lookup(&i);
}

static __always_inline struct thread *thread_find(u64 id)
{
	u32 tid = (u32)id;
	struct thread_slot *s = slot_of(tid);
	if (s && s->tid == tid)
		return &s->t;
	return threads.lookup(&tid);
}

/* The thread's entry, made on its first event if its process is traced;
 * NULL for threads that are not. */
static __always_inline struct thread *thread_of(u64 id)
{
	struct thread *t = thread_find(id);
	if (t || !traced(id >> 32))
		return t;
	u32 tid = (u32)id;
	struct thread n = {};
	n.exit_vcpu = -1;
	n.vcpu = -1;
	/* Only this thread claims a slot for its tid, but two threads may race
	 * for one slot: the compare-and-swap picks one, the other hashes. */
#if ATOMICS
	struct thread_slot *s = slot_of(tid);
	if (s && s->tid == 0 && __sync_val_compare_and_swap(&s->tid, 0, (u64)tid) == 0) {
		s->t = n;
		return &s->t;
	}
#endif
	threads.update(&tid, &n);
	return threads.lookup(&tid);
}

/* Forget the thread (it exited: its tid may come back in a process that is
 * not traced). */
static __always_inline void thread_forget(u64 id)
{
	u32 tid = (u32)id;
	struct thread_slot *s = slot_of(tid);
	if (s && s->tid == tid)
		s->tid = 0;
	else
		threads.delete(&tid);
}

/* The open exit of a thread, or NULL. */
static __always_inline struct thread *open_exit(u64 id)
{
	struct thread *t = thread_find(id);
	return t && t->exit_ns ? t : NULL;
}

/* Open an exit on ``t``, keeping its identity. */
static __always_inline void begin_exit(struct thread *t, u64 ns, u32 reason, u32 bits,
				       s32 exit_vcpu, u64 gpa, u32 len)
{
	t->exit_ns = ns;
	t->gpa = gpa;
	t->end_ns = 0;
	t->reason = reason;
	t->bits = bits;
	t->kvm_gen = 0;
	t->spte_gen = 0;
	t->len = len;
	t->exit_vcpu = exit_vcpu;
}

/* The thread's VM and vCPU: learnt at KVM_RUN, else the process (VM fd
 * unknown) and -1. */
static __always_inline u64 vm_of(struct thread *t, u64 id)
{
	return t->vm ? t->vm : (id >> 32) << 32;
}

static __always_inline s32 vcpu_of(struct thread *t)
{
	return t->exit_vcpu >= 0 ? t->exit_vcpu : t->vcpu;
}

struct hist_val { u64 count; u64 sum_ns; };
/* A histogram's key: MMIO intervals per (VM, vCPU, exit reason, SPTE
 * evidence bits), every other exit per (process, reason), bits 0 (an MMIO
 * interval has at least one of F_MMIO), VM 0 and vCPU -1; and log2 latency. */
struct mmio_hist_key { u64 vm; u32 pid; s32 vcpu; u32 reason; u16 bits; u16 slot; };
#if ATOMICS
/* Each key owns HIST_SLOTS counters in the array hist_counts, from the index
 * hist_keys gives it (allocated by the key's first interval, never moved or
 * freed, so user space sums nothing twice).  A thread keeps its last keys and
 * their indexes: an exit like a recent one touches one array element and no
 * hash.
 * In the TCG L1 a hash lookup or lookup-or-insert on every exit cost 0.85-1.84
 * us a run, an array element 0.88 us (bench/bpf_prog_cost, tracer/README.md).
 * The counters are shared by CPUs: atomic adds; a key's vCPU runs on one CPU
 * at a time, so they seldom contend. */
/* Keys a session can make (runs of a lab batch add theirs): 4 MiB of counters.
 * HIST_SLOTS (a power of 2) comes from loader.py. */
#define HIST_KEYS 4096
BPF_HASH(hist_keys, struct mmio_hist_key, u32, HIST_KEYS);  /* slot 0 */
BPF_ARRAY(hist_counts, struct hist_val, HIST_KEYS * HIST_SLOTS);
BPF_ARRAY(hist_nkeys, u64, 1);  /* keys allocated so far */

/* The first counter index + 1 of key ``k`` (slot 0), allocating it on first
 * use; 0 when all HIST_KEYS are taken. */
static __always_inline u32 hist_base(struct mmio_hist_key *k)
{
	u32 *b = hist_keys.lookup(k);
	if (b)
		return *b;
	u32 zero = 0;
	u64 *nkeys = hist_nkeys.lookup(&zero);
	if (!nkeys)
		return 0;
	u64 n = __sync_fetch_and_add(nkeys, 1);
	if (n >= HIST_KEYS)
		return 0;
	u32 base = n * HIST_SLOTS + 1;
	if (hist_keys.insert(k, &base) == 0)
		return base;
	/* another CPU inserted the key first: its counters; index n stays unused */
	b = hist_keys.lookup(k);
	return b ? *b : 0;
}
#else
/* Without atomics with fetch: hashes, looked up (or inserted) on every exit;
 * the MMIO one per CPU. */
struct hist_key { u32 pid; u32 reason; u32 slot; u32 pad; };
BPF_HASH(exit_hist, struct hist_key, struct hist_val, 8192);
#if AGGREGATE
BPF_PERCPU_HASH(mmio_hist, struct mmio_hist_key, struct hist_val, 16384);
#endif
#endif

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

#if ATOMICS
/* Count ``lat`` into key ``k``'s counters, found through the keys cached in
 * thread ``t`` (for its VM ``vm`` and vCPU ``vcpu``); false when all keys are
 * taken. */
static __always_inline bool hist_add(struct thread *t, u64 vm, s32 vcpu,
				     struct mmio_hist_key *k, u64 lat)
{
	u64 tag = (u64)k->reason << 32 | k->bits;
	u32 base = 0;
	if (t->hist_vm != vm || t->hist_vcpu != vcpu) {  /* a new identity */
		__builtin_memset(t->hist_base, 0, sizeof(t->hist_base));
		t->hist_vm = vm;
		t->hist_vcpu = vcpu;
	}
#pragma unroll
	for (int w = 0; w < HIST_WAYS; w++) {
		if (t->hist_base[w] && t->hist_tag[w] == tag)
			base = t->hist_base[w];
	}
	if (!base) {
		base = hist_base(k);
		u32 w = t->hist_next++ % HIST_WAYS;
		if (w < HIST_WAYS) {  /* for the verifier */
			t->hist_tag[w] = tag;
			t->hist_base[w] = base;
		}
	}
	u32 i = base - 1 + (log2_u64(lat) & (HIST_SLOTS - 1));
	struct hist_val *v = base ? hist_counts.lookup(&i) : NULL;
	if (!v)
		return false;
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->sum_ns, lat);
	return true;
}
#endif

/* Close the open exit of thread ``t`` at ``ns``: an MMIO interval becomes an
 * event (or, in aggregate mode, a count in its histogram), any other exit a
 * count in the exit histogram. */
static __always_inline void close_exit(void *ctx, u64 id, struct thread *t, u64 ns)
{
	bool mmio = t->bits & F_MMIO;
	u64 lat = ns - t->exit_ns;
	t->exit_ns = 0;  /* closed: the entry is reused by the next exit */
#if !AGGREGATE
	if (mmio) {
		struct event buf;
		struct event *e = ev_reserve(ctx, &buf, LOST_FAULT);
		if (e) {
			ev_init(e, EV_FAULT, id, ns - lat);
			e->ns2 = ns;
			e->a = t->gpa;
			e->b = ((u64)t->kvm_gen << 32) | t->spte_gen;
			e->c = t->bits;
			e->d = vm_of(t, id);
			e->x = vcpu_of(t);
			e->e = t->reason;
			e->f = t->len;
			ev_submit(ctx, e);
		}
		return;
	}
#endif
	if (!mmio && t->reason == EXIT_REASON_NONE)
		return;  /* no kvm_exit, no access: nothing to count */
	u64 vm = vm_of(t, id);
	s32 vcpu = vcpu_of(t);
	struct mmio_hist_key k = {};
	k.pid = id >> 32;
	k.reason = t->reason;
	k.vcpu = -1;
	if (mmio) {
		k.vm = vm;
		k.vcpu = vcpu;
		k.bits = t->bits & 0x1ff;
	}
#if ATOMICS
	if (!hist_add(t, vm, vcpu, &k, lat))  /* all keys taken */
		count_lost(mmio ? LOST_FAULT : LOST_EXIT);  /* counted, never silent */
#else
	struct hist_val zero = {};
	struct hist_val *v;
#if AGGREGATE
	if (mmio) {
		k.slot = log2_u64(lat);
		v = mmio_hist.lookup_or_try_init(&k, &zero);
		if (v) {
			v->count++;
			v->sum_ns += lat;
		} else {
			count_lost(LOST_FAULT);  /* map full: counted, never silent */
		}
		return;
	}
#endif
	struct hist_key hk = {.pid = k.pid, .reason = k.reason, .slot = log2_u64(lat)};
	v = exit_hist.lookup_or_try_init(&hk, &zero);
	if (v) {
		__sync_fetch_and_add(&v->count, 1);
		__sync_fetch_and_add(&v->sum_ns, lat);
	} else {
		count_lost(LOST_EXIT);  /* map full: counted, never silent */
	}
#endif
}
