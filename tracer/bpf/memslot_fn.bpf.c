/* kprobe/kfunc backends: kvm_set_memslot(kvm, old, new, change) and
 * kvm_mmu_invalidate_mmio_sptes(kvm, gen).  Struct field offsets come from
 * the running kernel's BTF (resolved in Python, passed as OFF_* defines);
 * nothing here relies on the header tree bcc compiles against.
 *
 * OFF_SLOT_{BASE_GFN,NPAGES,FLAGS,ID,AS_ID,UADDR}: struct kvm_memory_slot
 * OFF_KVM_MEMSLOTS: struct kvm.memslots[] (pointer array, per as_id)
 * OFF_MEMSLOTS_GEN: struct kvm_memslots.generation
 * USE_KFUNC: attach with fentry/fexit instead of kprobe/kretprobe.
 */

#define GEN_SRC_INVALIDATE 3

struct setmem_state {
	u64 begin_ns;
	u64 kvm;
	u64 base_gfn;
	u64 npages;
	u64 uaddr;
	u64 gen_before;
	u32 slot;
	u32 flags;
	u32 change;
};
BPF_TABLE("lru_hash", u32, struct setmem_state, setmem, 1024);

static __always_inline u64 vm_of_kvm(u64 kvm, u32 pid)
{
	u64 *vm = kvm_vm.lookup(&kvm);
	return vm ? *vm : (u64)pid << 32;
}

/* A kernel field of ``size`` bytes (1-8, a constant once inlined) at
 * ``base + off``; 0 where the base is NULL or BTF has no such field (off < 0,
 * e.g. as_id on older kernels).  Read into the low bytes of a zeroed u64,
 * which is the field's value on a little-endian machine (x86). */
static __always_inline u64 rd(u64 base, int off, u32 size)
{
	u64 v = 0;
	if (base && off >= 0)
		bpf_probe_read_kernel(&v, size, (void *)(base + off));
	return v;
}

static __always_inline u64 kvm_gen(u64 kvm, u32 as_id)
{
	u64 slots = rd(kvm, OFF_KVM_MEMSLOTS + 8 * (as_id & 1), 8);
	return rd(slots, OFF_MEMSLOTS_GEN, 8);
}

static __always_inline int setmem_enter(u64 kvm, u64 old, u64 new, u32 change)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	if (!traced(id >> 32))
		return 0;
#if IOCTL_FREE
	u64 vm = memslot_ioctl_vm(id);
	if (vm)
		kvm_vm.update(&kvm, &vm);
#else
	struct pending_ioctl *p = pending.lookup(&tid);
	if (p && memslot_cmd(p->cmd)) {
		u64 vm = ((id >> 32) << 32) | p->fd;
		kvm_vm.update(&kvm, &vm);
	}
#endif
	u64 s = new ? new : old;  /* DELETE has no new slot, CREATE no old */
	struct setmem_state st = {};
	st.begin_ns = bpf_ktime_get_ns();
	st.kvm = kvm;
	st.change = change;
	st.base_gfn = rd(s, OFF_SLOT_BASE_GFN, 8);
	st.npages = rd(s, OFF_SLOT_NPAGES, 8);
	st.uaddr = rd(s, OFF_SLOT_UADDR, 8);
	st.flags = rd(s, OFF_SLOT_FLAGS, 4);
	u32 as_id = rd(s, OFF_SLOT_AS_ID, 2);
	st.slot = (as_id << 16) | rd(s, OFF_SLOT_ID, 2);
	st.gen_before = kvm_gen(kvm, as_id);
	setmem.update(&tid, &st);
	return 0;
}

static __always_inline int setmem_exit(void *ctx, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct setmem_state *st = setmem.lookup(&tid);
	if (!st)
		return 0;
	struct event buf;
	struct event *e = ev_reserve(ctx, &buf, LOST_MEMSLOT);
	if (e) {
		ev_init(e, EV_SETMEM, id, st->begin_ns);
		e->ns2 = bpf_ktime_get_ns();
		e->a = st->base_gfn;
		e->b = st->npages;
		e->c = st->uaddr;
		e->d = vm_of_kvm(st->kvm, id >> 32);
		e->e = st->slot;
		e->f = (st->flags & 0xffffff) | (st->change << 24);
		e->g = st->gen_before;
		e->h = kvm_gen(st->kvm, st->slot >> 16);
		e->x = (s32)ret;
		ev_submit(ctx, e);
	}
	setmem.delete(&tid);
	return 0;
}

static __always_inline int invalidate(void *ctx, u64 kvm, u64 gen)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!traced(id >> 32))
		return 0;
	struct event buf;
	struct event *e = ev_reserve(ctx, &buf, LOST_GEN);
	if (e) {
		ev_init(e, EV_GEN, id, bpf_ktime_get_ns());
		e->a = gen;
		e->d = vm_of_kvm(kvm, id >> 32);
		e->e = GEN_SRC_INVALIDATE;
		ev_submit(ctx, e);
	}
	return 0;
}

#if USE_KFUNC
/* fentry/fexit, loaded and attached from Python with bpf(2) (tracer/bpfsys.py):
 * bcc 0.26 attaches kfuncs to vmlinux functions only, and these are in kvm.ko.
 * The arguments are ctx[0..n-1]; fexit's return value follows them. */
int fentry_set_memslot(u64 *ctx)
{
	return setmem_enter(ctx[0], ctx[1], ctx[2], (u32)ctx[3]);
}

int fexit_set_memslot(u64 *ctx)
{
	return setmem_exit(ctx, (int)ctx[4]);
}

int fentry_invalidate_mmio(u64 *ctx)
{
	return invalidate(ctx, ctx[0], ctx[1]);
}
#else
/* Attached by name from Python (not bcc's kprobe__ auto-attach), so the
 * programs can also be loaded and verified on a host without kprobes. */
int on_set_memslot(struct pt_regs *ctx, void *kvm, void *old, void *new, int change)
{
	return setmem_enter((u64)kvm, (u64)old, (u64)new, change);
}

int on_set_memslot_ret(struct pt_regs *ctx)
{
	return setmem_exit(ctx, PT_REGS_RC(ctx));
}

int on_invalidate_mmio_sptes(struct pt_regs *ctx, void *kvm, u64 gen)
{
	return invalidate(ctx, (u64)kvm, gen);
}
#endif
