/*
 * slotscope bare-metal guest: a 64 KiB firmware image loaded with -bios.
 *
 * No OS, no SeaBIOS: from the reset vector it enters 32-bit flat protected
 * mode and loops forever over
 *   - a read and a write on each of NPAGES distinct pages starting at
 *     MMIO_BASE (an unbacked GPA range or a device BAR: every access is an
 *     MMIO exit under KVM; >= 2 pages so KVM's per-vCPU MMIO cache does not
 *     hide the slow path),
 *   - a 64-bit loop counter at COUNTER_GPA in RAM (read it over QMP),
 *   - the PIIX4 ACPI memory-hotplug handshake: when GPE0 status (0xafe0)
 *     bit 3 is set, scan slots 0..NSLOTS-1 through the selector (0x0a00)
 *     and status/command (0x0a14) registers; a slot with "insert" (bit 1)
 *     is acknowledged (write 2), a slot with "remove requested" (bit 2)
 *     has that event cleared (write 4) and is then ejected (write 8).  That is all QEMU
 *     needs to finish device_del of a pc-dimm.
 * Serial (COM1, 0x3f8) gets "slotscope-bare ready", then "+N" per plug
 * acknowledged and "-N" per eject.  With -smp N the other vCPUs run the
 * MMIO loop too (see start_aps), each with its own counter.
 *
 * No exception is expected.  One that happens anyway (under nested
 * emulation, say) is not left to triple-fault silently: an IDT in RAM
 * sends every vector 0..31 to a handler that prints
 * "!exc VV err EEEEEEEE eip EEEEEEEE" and halts that vCPU.  A non-zero
 * trap_after parameter executes ud2 once the loop count reaches it, to
 * test exactly that path.
 *
 * The launcher patches the parameter block (magic "SLOTSCOP") per run.
 */
	.set	IMAGE_BASE, 0xffff0000
	.set	COM1, 0x3f8
	.set	GPE0_STS, 0xafe0
	.set	GPE_MEM_HOTPLUG, 8
	.set	MHP_SEL, 0x0a00
	.set	MHP_STS, 0x0a14
	.set	MHP_INSERT, 2
	.set	MHP_REMOVE, 4
	.set	MHP_EJECT, 8

	.text
	.globl	_start
_start:

/* Parameter block at image offset 0x10. */
	.org	0x10
params:
	.ascii	"SLOTSCOP"
p_version:	.long	2
p_mmio_base:	.long	0xc0000000
p_npages:	.long	4
p_stride:	.long	4096
p_nslots:	.long	32
p_counter:	.long	0x7000
p_trap_after:	.long	0

	.org	0x100
gdt:
	.quad	0
	/* Accessed bits preset: the GDT is in ROM, so the CPU must not need
	 * to write them (kvm_pvm's emulator
	 * retries that write forever). */
	.quad	0x00cf9b000000ffff	/* 0x08: code, flat 4 GiB, 32-bit */
	.quad	0x00cf93000000ffff	/* 0x10: data, flat 4 GiB */
gdt_end:
gdtr:
	.word	gdt_end - gdt - 1
	.long	gdt

banner:	.asciz	"slotscope-bare ready\n"
exc_msg:	.asciz	"!exc "
exc_err:	.asciz	" err "
exc_eip:	.asciz	" eip "

	.set	IDT_RAM, 0x5000		/* 32 gates, built at boot */
idtr:
	.word	32 * 8 - 1
	.long	IDT_RAM

	.code16
start16:
	cli
	cld
	lgdtl	%cs:(gdtr - _start)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x08, $start32

	.code32
start32:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$0x9000, %esp
	movl	p_counter, %edi
	movl	$0, (%edi)
	movl	$0, 4(%edi)
	call	setup_idt
	call	start_aps
	movl	$banner, %esi
	call	puts

main_loop:
	movl	p_mmio_base, %ebx
	movl	p_npages, %ecx
1:	movl	(%ebx), %eax		/* MMIO read */
	movl	%ecx, 8(%ebx)		/* MMIO write */
	addl	p_stride, %ebx
	loop	1b
	movl	p_counter, %edi
	addl	$1, (%edi)
	adcl	$0, 4(%edi)
	movl	p_trap_after, %eax
	testl	%eax, %eax
	jz	9f
	cmpl	(%edi), %eax
	jne	9f
	ud2				/* the test's deliberate exception */
9:
	movw	$GPE0_STS, %dx
	inb	%dx, %al
	testb	$GPE_MEM_HOTPLUG, %al
	jz	main_loop
	movb	$GPE_MEM_HOTPLUG, %al	/* write-1-to-clear before the scan */
	outb	%al, %dx

	xorl	%esi, %esi
scan:
	movw	$MHP_SEL, %dx
	movl	%esi, %eax
	outl	%eax, %dx
	movw	$MHP_STS, %dx
	inb	%dx, %al
	movb	%al, %bl
	testb	$MHP_INSERT, %bl
	jz	2f
	movb	$MHP_INSERT, %al	/* acknowledge the insert */
	outb	%al, %dx
	movb	$'+', %al
	call	put_slot
2:	testb	$MHP_REMOVE, %bl
	jz	3f
	/* Clear the remove event BEFORE ejecting, as QEMU's own AML does:
	 * eject leaves is_removing set, and a late clear could swallow the
	 * remove request of the next dimm plugged into this slot. */
	movw	$MHP_STS, %dx
	movb	$MHP_REMOVE, %al
	outb	%al, %dx
	movb	$MHP_EJECT, %al
	outb	%al, %dx
	movb	$'-', %al
	call	put_slot
3:	incl	%esi
	cmpl	p_nslots, %esi
	jb	scan
	jmp	main_loop

/* "<al><slot in decimal>\n" for slot %esi < 1000; keeps %esi and %ebx. */
put_slot:
	call	putc
	movl	%esi, %eax
	cmpl	$100, %eax
	jb	4f
	xorl	%edx, %edx
	movl	$100, %ecx
	divl	%ecx
	addb	$'0', %al
	call	putc
	movl	%edx, %eax
4:	cmpl	$10, %esi
	jb	5f
	xorl	%edx, %edx
	movl	$10, %ecx
	divl	%ecx
	addb	$'0', %al
	call	putc
	movl	%edx, %eax
5:	addb	$'0', %al
	call	putc
	movb	$'\n', %al
	jmp	putc

/*
 * Other vCPUs wait for INIT-SIPI.  Copy the real-mode trampoline to
 * TRAMPOLINE (the SIPI vector page), then INIT and SIPI all but ourselves
 * through the local APIC.  Each AP takes the next counter slot
 * (COUNTER_GPA + 8 * n, n = 1, 2, ...) and runs the MMIO loop only: the
 * hotplug handshake and serial stay with the boot vCPU.
 */
	.set	TRAMPOLINE, 0x8000
	.set	APIC_ICR_LO, 0xfee00300
	.set	AP_NEXT, 0x6ff8		/* next AP index, bumped with lock xadd */
start_aps:
	movl	$1, AP_NEXT
	movl	$tramp, %esi
	movl	$TRAMPOLINE, %edi
	movl	$(tramp_end - tramp), %ecx
	rep movsb
	movl	$0x000c4500, APIC_ICR_LO	/* INIT, all excluding self */
	movl	$20000, %ecx
7:	loop	7b
	movl	$(0x000c4600 | (TRAMPOLINE >> 12)), APIC_ICR_LO	/* SIPI */
	ret

ap32:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	lidtl	idtr
	movl	$1, %edi
	lock xaddl %edi, AP_NEXT
	shll	$3, %edi
	addl	p_counter, %edi
	movl	$0, (%edi)
	movl	$0, 4(%edi)
ap_loop:
	movl	p_mmio_base, %ebx
	movl	p_npages, %ecx
8:	movl	(%ebx), %eax
	movl	%ecx, 8(%ebx)
	addl	p_stride, %ebx
	loop	8b
	addl	$1, (%edi)
	adcl	$0, 4(%edi)
	jmp	ap_loop

/* Copied to TRAMPOLINE; an AP starts here in real mode with CS = 0x0800. */
	.code16
tramp:
	cli
	lgdtl	%cs:(tramp_gdtr - tramp)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x08, $ap32
tramp_gdtr:
	.word	gdt_end - gdt - 1
	.long	gdt
tramp_end:
	.code32

/* 32 interrupt gates (selector 0x08) at IDT_RAM, one per 16-byte stub. */
setup_idt:
	movl	$IDT_RAM, %edi
	movl	$exc_stubs, %eax
	xorl	%ecx, %ecx
1:	movl	%eax, %edx
	andl	$0xffff, %edx
	orl	$0x00080000, %edx
	movl	%edx, (%edi)
	movl	%eax, %edx
	andl	$0xffff0000, %edx
	orl	$0x8e00, %edx		/* present, DPL 0, 32-bit interrupt gate */
	movl	%edx, 4(%edi)
	addl	$8, %edi
	addl	$16, %eax
	incl	%ecx
	cmpl	$32, %ecx
	jb	1b
	lidtl	idtr
	ret

/* Stub n pushes a 0 error code where the CPU pushes none, then n. */
	.balign	16
exc_stubs:
	.irp	n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.balign	16
	.if	!((\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
	pushl	$0
	.endif
	pushl	$\n
	jmp	exc_common
	.endr

exc_common:
	movl	$exc_msg, %esi
	call	puts
	popl	%eax			/* vector */
	shll	$24, %eax
	movl	$2, %ecx
	call	put_hex
	movl	$exc_err, %esi
	call	puts
	popl	%eax			/* error code */
	movl	$8, %ecx
	call	put_hex
	movl	$exc_eip, %esi
	call	puts
	popl	%eax			/* faulting eip */
	movl	$8, %ecx
	call	put_hex
	movb	$'\n', %al
	call	putc
	cli
9:	hlt
	jmp	9b

/* The top %ecx nibbles of %eax in hex. */
put_hex:
	roll	$4, %eax
	pushl	%eax
	andb	$0xf, %al
	addb	$'0', %al
	cmpb	$'9', %al
	jbe	1f
	addb	$('a' - '9' - 1), %al
1:	call	putc
	popl	%eax
	loop	put_hex
	ret

puts:
	lodsb
	testb	%al, %al
	jz	6f
	call	putc
	jmp	puts
6:	ret

putc:
	pushl	%edx
	movw	$COM1, %dx
	outb	%al, %dx
	popl	%edx
	ret

/* Reset vector: the CPU starts at 0xfffffff0 in real mode, CS base 0xffff0000. */
	.code16
	.org	0xfff0
	jmp	start16
	.org	0x10000
