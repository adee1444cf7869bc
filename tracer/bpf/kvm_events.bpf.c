/* What every backend attaches: KVM ioctls (vCPU identity, returns to user
 * space and, for the tracepoint-only backend, memslot updates; no hook,
 * fentry/fexit on the syscall, or the syscall tracepoints, the first the
 * kernel allows: Capabilities.ioctl_hook), kvm_mmio,
 * the kvm_exit -> kvm_entry interval with its kvmmmu MMIO SPTE state, and
 * zap-all.  Python prepends the defines and common.bpf.c.
 */

#define KVM_CREATE_VM 0xae01
#define KVM_CREATE_VCPU 0xae41
#define KVM_RUN 0xae80
#define KVM_SET_USER_MEMORY_REGION 0x4020ae46
#define KVM_SET_USER_MEMORY_REGION2 0x40a0ae49

#define GEN_SRC_CHECK 1
#define GEN_SRC_MARK 2

/* First 32 bytes of kvm_userspace_memory_region and ...region2 (UAPI). */
struct region {
	u32 slot;
	u32 flags;
	u64 gpa;
	u64 size;
	u64 uaddr;
};

struct pending_ioctl {
	u64 begin_ns;
	u32 cmd;
	u32 fd;
	u64 arg;
	struct region r;
};
BPF_TABLE("lru_hash", u32, struct pending_ioctl, pending, 4096);

/* struct kvm * -> slotscope vm id (pid << 32 | vm fd), learnt when
 * kvm_set_memslot runs inside a memslot ioctl on the VM's fd (kprobe/kfunc
 * backends); under IOCTL_FREE also how a vCPU thread finds its VM. */
BPF_HASH(kvm_vm, u64, u64, 1024);
/* pid -> the VM id of a process's only VM, seeded from /proc for VMs that
 * existed before the programs attached (probes.seed_vcpus): under
 * IOCTL_FREE, a VM whose memslots do not change while recording is never
 * seen in kvm_set_memslot, so its struct kvm stays unknown. */
BPF_HASH(pid_vm, u32, u64, 1024);

static __always_inline bool memslot_cmd(u32 cmd)
{
	return cmd == KVM_SET_USER_MEMORY_REGION || cmd == KVM_SET_USER_MEMORY_REGION2;
}

#if IOCTL_FREE || IOCTL_FENTRY
/* An ioctl's arguments as the syscall saved the user's registers (x86-64
 * pt_regs at ``regs``: arg in dx, cmd in si, fd in di, the syscall number in
 * orig_ax, adjacent), in one read. */
struct ioctl_regs { u64 arg, cmd, fd, nr; };
_Static_assert(offsetof(struct pt_regs, si) == offsetof(struct pt_regs, dx) + 8 &&
	       offsetof(struct pt_regs, di) == offsetof(struct pt_regs, dx) + 16 &&
	       offsetof(struct pt_regs, orig_ax) == offsetof(struct pt_regs, dx) + 24,
	       "x86-64 pt_regs: dx, si, di, orig_ax adjacent");

static __always_inline struct ioctl_regs ioctl_regs(u64 regs)
{
	struct ioctl_regs r = {};
	if (regs)
		bpf_probe_read_kernel(&r, sizeof(r), (void *)(regs + offsetof(struct pt_regs, dx)));
	return r;
}
#endif

#if IOCTL_FREE
/* No hook on the ioctl syscall (capabilities.Capabilities.ioctl_free): the
 * syscall's own arguments are read where they are needed, from the user
 * registers the syscall saved (bpf_task_pt_regs).  The VM id of the
 * memslot ioctl the current thread is in (pid << 32 | fd), or 0 when it is
 * not in one (KVM's internal memslots are set from other ioctls). */
#define NR_IOCTL 16  /* x86-64 */
static __always_inline u64 memslot_ioctl_vm(u64 id)
{
	struct ioctl_regs r = ioctl_regs((u64)bpf_task_pt_regs(bpf_get_current_task_btf()));
	if (r.nr != NR_IOCTL || !memslot_cmd((u32)r.cmd))
		return 0;
	return ((id >> 32) << 32) | (u32)r.fd;
}
#endif

/* Last masked MMIO generation seen per VM, so generation rows are emitted
 * only when it changes (check_mmio_spte fires on every MMIO fault). */
BPF_HASH(last_gen, u64, u32, 1024);

/* A KVM ioctl's start and end: the vCPU's identity at KVM_RUN, the fds
 * KVM_CREATE_VM and KVM_CREATE_VCPU return, memslot ioctls (for the
 * tracepoint backend, its memslot rows), KVM_RUN returning mid-exit. */
static __always_inline void ioctl_enter(void *ctx, u32 fd, u32 cmd, u64 arg)
{
	/* Every ioctl on the machine lands here: the command decides before any
	 * map is touched. */
	if (cmd != KVM_RUN && cmd != KVM_CREATE_VM && cmd != KVM_CREATE_VCPU && !memslot_cmd(cmd))
		return;
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_of(id);
	if (!t)
		return;
	if (cmd == KVM_RUN) {
		if (t->exit_ns && (t->bits & F_SYNTH))
			close_exit(ctx, id, t, bpf_ktime_get_ns());
		if (!t->vm) {
			struct vcpu_key k = {.pid = id >> 32, .fd = fd};
			struct vcpu_info *vi = vcpu_fds.lookup(&k);
			if (vi) {
				t->vm = vi->vm;
				t->vcpu = vi->vcpu;
			}
		}
		return;
	}
	struct pending_ioctl p = {};
	p.begin_ns = bpf_ktime_get_ns();
	p.cmd = cmd;
	p.fd = fd;
	p.arg = arg;
	if (memslot_cmd(cmd))
		bpf_probe_read_user(&p.r, sizeof(p.r), (void *)arg);
	u32 tid = (u32)id;
	pending.update(&tid, &p);
	t->pending = 1;
}

static __always_inline void ioctl_exit(void *ctx, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	struct thread *t = thread_find(id);
	if (!t)
		return;
	if (t->exit_ns && !(t->bits & F_TO_USER)) {
		t->bits |= F_TO_USER;  /* KVM_RUN returns to the VMM mid-exit */
		/* A clock read costs ~9 us a run in the TCG L1 (bpf_prog_cost), so
		 * only an exit without kvm_exit, whose access time is its start,
		 * pays for one here. */
		if (t->bits & F_SYNTH)
			t->end_ns = bpf_ktime_get_ns();
	}
	if (!t->pending)
		return;
	t->pending = 0;
	struct pending_ioctl *p = pending.lookup(&tid);
	if (!p)
		return;
	u64 ns = bpf_ktime_get_ns();
	if (p->cmd == KVM_CREATE_VCPU) {
		if (ret >= 0) {
			struct vcpu_key k = {.pid = pid, .fd = (u32)ret};
			struct vcpu_info vi = {};
			vi.vm = ((u64)pid << 32) | p->fd;
			vi.vcpu = (s32)p->arg;
			vcpu_fds.update(&k, &vi);
		}
	} else if (p->cmd == KVM_CREATE_VM) {
		if (ret >= 0) {
			struct event buf;
			struct event *e = ev_reserve(ctx, &buf, LOST_VM);
			if (e) {
				ev_init(e, EV_VM, id, ns);
				e->d = ((u64)pid << 32) | (u32)ret;
				ev_submit(ctx, e);
			}
		}
	} else if (MEMSLOT_FROM_IOCTL) {
		struct event buf;
		struct event *e = ev_reserve(ctx, &buf, LOST_MEMSLOT);
		if (e) {
			ev_init(e, EV_MEMSLOT, id, p->begin_ns);
			e->ns2 = ns;
			e->a = p->r.gpa;
			e->b = p->r.size;
			e->c = p->r.uaddr;
			e->d = ((u64)pid << 32) | p->fd;
			e->e = p->r.slot;
			e->f = p->r.flags;
			e->x = (s32)ret;
			ev_submit(ctx, e);
		}
	}
	pending.delete(&tid);
}

#if IOCTL_FREE
/* KVM_RUN's return to the VMM, without a hook on every ioctl: raw
 * kvm_userspace_exit(u32 reason, int errno) fires as kvm_vcpu_ioctl's
 * KVM_RUN ends.  An exit still open here is finished by the VMM. */
RAW_TRACEPOINT_PROBE(kvm_userspace_exit)
{
	struct thread *t = open_exit(bpf_get_current_pid_tgid());
	if (t)
		t->bits |= F_TO_USER;
	return TP_KEEP;
}
#elif IOCTL_FENTRY
/* fentry/fexit on the ioctl syscall, long __x64_sys_ioctl(const struct
 * pt_regs *regs), loaded and attached from Python with bpf(2): unlike a
 * syscall tracepoint, which sends every syscall of every process through
 * the traced slow path, these run on ioctls only (capabilities._ioctl_fentry).
 * The arguments are the user's registers (ioctl_regs).  A tracing program
 * must return 0. */
int fentry_ioctl(u64 *ctx)
{
	struct ioctl_regs r = ioctl_regs(ctx[0]);
	ioctl_enter(ctx, (u32)r.fd, (u32)r.cmd, r.arg);
	return 0;
}

int fexit_ioctl(u64 *ctx)
{
	ioctl_exit(ctx, (long)ctx[1]);
	return 0;
}
#else
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	ioctl_enter(args, (u32)args->fd, (u32)args->cmd, args->arg);
	return TP_KEEP;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	ioctl_exit(args, args->ret);
	return TP_KEEP;
}
#endif

/* One MMIO access KVM emulates (every access on kvm_pvm, coalesced or not).
 * ``val`` is the classic record's value field, or under RAW_KVM_MMIO the
 * tracepoint's pointer to the data (mmio_val reads it). */
static __always_inline u64 mmio_val(u32 len, u64 val)
{
#if RAW_KVM_MMIO
	/* What the classic record holds (TP_fast_assign of kvm_mmio): min(len, 8)
	 * bytes of the data, zero-extended; 0 where KVM passed no data (an
	 * unsatisfied read). */
	u64 v = 0;
	u64 n = len;
	/* clang would bound a zero-extended copy of len and pass the original
	 * register, which the verifier then refuses as unbounded: the empty asm
	 * makes n one opaque register, bounded where it is passed. */
	asm volatile("" : "+r"(n));
	if (n > 8)
		n = 8;
	if (val)
		bpf_probe_read_kernel(&v, n, (void *)val);
	return v;
#else
	return val;
#endif
}

static __always_inline int on_mmio(void *ctx, u32 type, u32 len, u64 gpa, u64 val)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_of(id);
	if (!t)
		return TP_KEEP;
#if EMIT_MMIO
	u64 ns = bpf_ktime_get_ns();
	struct event buf;
	struct event *e = ev_reserve(ctx, &buf, LOST_MMIO);
	if (e) {
		ev_init(e, EV_MMIO, id, ns);
		e->a = gpa;
		e->b = mmio_val(len, val);
		e->d = vm_of(t, id);
		e->e = type;
		e->f = len;
		e->x = t->vcpu;
		ev_submit(ctx, e);
	}
#endif
	if (t->exit_ns) {
		t->bits |= F_ACCESS | (type == 2 ? F_WRITE : 0);
		t->gpa = gpa;
		t->len = len;
#if EMIT_MMIO
		t->end_ns = ns;
#endif
	} else if (type != 1) {
		/* No kvm_exit on this kernel (e.g. kvm_pvm): the MMIO interval runs
		 * from the emulated access to the vCPU's next KVM_RUN. */
#if !EMIT_MMIO
		u64 ns = bpf_ktime_get_ns();
#endif
		begin_exit(t, ns, EXIT_REASON_NONE,
			   F_ACCESS | F_SYNTH | (type == 2 ? F_WRITE : 0), -1, gpa, len);
	}
	return TP_KEEP;
}

#if RAW_KVM_MMIO
/* Raw: the program runs from the tracepoint's call with its arguments,
 * before (and without) the perf record a classic tracepoint builds for its
 * program: TP_PROTO(int type, int len, u64 gpa, void *val), checked against
 * the kernel's BTF by capabilities._raw_mmio.  A raw tracepoint program's
 * return is ignored: it filters no perf event, so perf's kvm_mmio count is
 * untouched either way. */
RAW_TRACEPOINT_PROBE(kvm_mmio)
{
	return on_mmio(ctx, (u32)ctx->args[0], (u32)ctx->args[1], ctx->args[2], ctx->args[3]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_mmio)
{
	return on_mmio(args, args->type, args->len, args->gpa, args->val);
}
#endif

/* kvm_exit opens an exit on the vCPU's thread with its reason, vCPU id and,
 * for SVM's nested page fault, the faulting GPA (exit_info_2). */
#if RAW_KVM_EXIT
/* Raw: TP_PROTO(struct kvm_vcpu *vcpu, u32 isa).  The classic record's
 * fields come from the vendor's get_exit_info; here the same fields are read
 * where it reads them, at offsets from the vendor module's BTF
 * (btf.exit_offsets): the thread is looked up first, so an untraced VM pays
 * for no read. */
RAW_TRACEPOINT_PROBE(kvm_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_of(id);
	if (!t)
		return TP_KEEP;
	char *vcpu = (char *)ctx->args[0];
	u32 isa = (u32)ctx->args[1];
	s32 vcpu_id = -1;
	u32 reason = 0;
	u64 gpa = 0;
	bpf_probe_read_kernel(&vcpu_id, sizeof(vcpu_id), vcpu + OFF_VCPU_ID);
#ifdef OFF_SVM_VMCB
	char *vmcb = NULL;
	bpf_probe_read_kernel(&vmcb, sizeof(vmcb), vcpu - OFF_VENDOR_VCPU + OFF_SVM_VMCB);
	if (vmcb) {
		bpf_probe_read_kernel(&reason, sizeof(reason), vmcb + OFF_VMCB_EXIT_CODE);
		if (isa == 2 && reason == 0x400)
			bpf_probe_read_kernel(&gpa, sizeof(gpa), vmcb + OFF_VMCB_EXIT_INFO2);
	}
#else
	bpf_probe_read_kernel(&reason, sizeof(reason), vcpu - OFF_VENDOR_VCPU + OFF_VMX_EXIT_REASON);
#endif
#if IOCTL_FREE
	/* The thread's identity, once: the vCPU id, and the VM its struct kvm
	 * was learnt as (at a memslot update; a VM none was seen for stays
	 * unknown and is asked again at the next exit). */
	if (t->vcpu < 0)
		t->vcpu = vcpu_id;
	if (!t->vm) {
		u64 kvm = 0;
		bpf_probe_read_kernel(&kvm, sizeof(kvm), vcpu + OFF_VCPU_KVM);
		u64 *vm = kvm_vm.lookup(&kvm);
		if (!vm) {  /* a VM older than the programs: its process's only one */
			u32 pid = id >> 32;
			vm = pid_vm.lookup(&pid);
		}
		if (vm)
			t->vm = *vm;
	}
#endif
	begin_exit(t, bpf_ktime_get_ns(), reason, 0, vcpu_id, gpa, 0);
	return TP_KEEP;
}
#elif defined(HAVE_KVM_EXIT)
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_of(id);
	if (!t)
		return TP_KEEP;
	u32 reason = args->exit_reason;
	/* SVM's nested page fault carries the faulting GPA in exit_info_2. */
	u64 gpa = args->isa == 2 && reason == 0x400 ? args->info2 : 0;
	begin_exit(t, bpf_ktime_get_ns(), reason, 0, args->vcpu_id, gpa, 0);
	return TP_KEEP;
}
#endif

static __always_inline void on_entry(void *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = open_exit(id);
	if (t)
		close_exit(ctx, id, t, bpf_ktime_get_ns());
}

#if RAW_KVM_ENTRY
/* Raw: the arguments (the vCPU, and since 6.9 force_immediate_exit) are not
 * read; the thread's open exit closes. */
RAW_TRACEPOINT_PROBE(kvm_entry)
{
	on_entry(ctx);
	return TP_KEEP;
}
#elif defined(HAVE_KVM_ENTRY)
TRACEPOINT_PROBE(kvm, kvm_entry)
{
	on_entry(args);
	return TP_KEEP;
}
#endif

static __always_inline void gen_seen(void *ctx, u64 id, struct thread *t, u32 gen,
				    u32 source)
{
	u64 vm = vm_of(t, id);
	/* The thread's own last generation first: check_mmio_spte runs on every
	 * MMIO fault, and a vCPU sees its VM's generation change only at memslot
	 * updates, so the per-VM map is looked up only then (a hash lookup, on
	 * every fault before: ~0.6 us in the TCG L1, the kvm_exit variants in
	 * tracer/README.md). */
	if (t->gen_vm == vm && t->gen_seen == gen + 1)
		return;
	t->gen_vm = vm;
	t->gen_seen = gen + 1;
	u32 *last = last_gen.lookup(&vm);
	if (last && *last == gen)
		return;
	last_gen.update(&vm, &gen);
	struct event buf;
	struct event *e = ev_reserve(ctx, &buf, LOST_GEN);
	if (e) {
		ev_init(e, EV_GEN, id, bpf_ktime_get_ns());
		e->a = gen;
		e->d = vm;
		e->e = source;
		ev_submit(ctx, e);
	}
}

/* An MMIO SPTE met in the open exit of this thread: checked (``check``:
 * the generations compared on a fault) or marked anew (``gfn`` of the page).
 * Either way the VM's current generation was seen. */
static __always_inline void spte_seen(void *ctx, bool check, u32 kvm_gen, u32 spte_gen,
				     u64 gfn)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_of(id);
	if (!t)
		return;
	if (t->exit_ns && check) {
		/* handle_mmio_page_fault takes its fast path exactly when this check
		 * passes (check_mmio_spte returns kvm_gen == spte_gen, and the fault
		 * is handled from the SPTE): the bit is read here, not from a
		 * program on kvmmmu:handle_mmio_page_fault, which would run on
		 * every fast MMIO fault (0.3 us a run in the TCG L1) for this bit
		 * and an address that is 0 under TDP and the guest-virtual one under
		 * shadow paging (kvm_mmio gives the GPA). */
		t->bits |= F_CHECKED | (kvm_gen == spte_gen ? F_FAST_HIT : F_STALE);
		t->kvm_gen = kvm_gen;
		t->spte_gen = spte_gen;
	} else if (t->exit_ns) {
		t->bits |= F_REMARKED;
		if (!t->gpa)
			t->gpa = gfn << 12;
	}
	gen_seen(ctx, id, t, kvm_gen, check ? GEN_SRC_CHECK : GEN_SRC_MARK);
}

#if RAW_CHECK_MMIO_SPTE
/* Raw: TP_PROTO(u64 spte, unsigned int kvm_gen, unsigned int spte_gen). */
RAW_TRACEPOINT_PROBE(check_mmio_spte)
{
	spte_seen(ctx, true, (u32)ctx->args[1], (u32)ctx->args[2], 0);
	return TP_KEEP;
}
#elif defined(HAVE_CHECK_MMIO_SPTE)
TRACEPOINT_PROBE(kvmmmu, check_mmio_spte)
{
	spte_seen(args, true, args->kvm_gen, args->spte_gen, 0);
	return TP_KEEP;
}
#endif

#ifdef HAVE_MARK_MMIO_SPTE
TRACEPOINT_PROBE(kvmmmu, mark_mmio_spte)
{
	spte_seen(args, false, args->gen, args->gen, args->gfn);
	return TP_KEEP;
}
#endif

#ifdef HAVE_KVM_MMU_ZAP_ALL_FAST
TRACEPOINT_PROBE(kvmmmu, kvm_mmu_zap_all_fast)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32;
	if (!traced(pid))
		return TP_KEEP;
	struct event buf;
	struct event *e = ev_reserve(args, &buf, LOST_ZAP);
	if (e) {
		ev_init(e, EV_ZAP, id, bpf_ktime_get_ns());
		e->a = args->mmu_valid_gen;
		/* zap-all runs inside the memslot ioctl on the VM's fd */
#if IOCTL_FREE
		u64 vm = memslot_ioctl_vm(id);
		e->d = vm ? vm : (u64)pid << 32;
#else
		u32 tid = (u32)id;
		struct pending_ioctl *p = pending.lookup(&tid);
		e->d = ((u64)pid << 32) | (p ? p->fd : 0);
#endif
		ev_submit(args, e);
	}
	return TP_KEEP;
}
#endif

/* A vCPU thread that exits mid-exit (the VMM stopped after an MMIO exit, or
 * was killed) never reaches kvm_entry: close its interval here, marked.  It
 * ends at the access KVM handed to the VMM (kvm_mmio, stream mode) or where
 * KVM_RUN returned (no kvm_exit on this kernel): the VMM's own share of the
 * exit is unknown.  In aggregate mode, where kvm_mmio reads no clock, at the
 * thread's exit. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	struct thread *t = thread_find(id);
	if (!t)
		return TP_KEEP;
	/* an unfinished non-MMIO exit has no latency: dropped */
	if (t->exit_ns && (t->bits & F_MMIO)) {
		t->bits |= F_UNFINISHED;
		close_exit(args, id, t, t->end_ns ? t->end_ns : bpf_ktime_get_ns());
	}
	thread_forget(id);
	return TP_KEEP;
}
