/*
 * slotscope micro-VMM guest: the real-mode loops vmrig.microvm runs.
 *
 * The VMM loads the flat image at CODE_GPA, starts each vCPU in real mode
 * at the entry the header names (CS = DS = 0, ES on the MMIO range, BX the
 * vCPU index) and never lets it reach anything but MMIO and port
 * SIGNAL_PORT.  Every access is to an unbacked page, so under KVM each
 * one is an MMIO access the VMM can count exactly.
 *
 * Assembled per run (vmrig/microvm/guest.py) with --defsym:
 *   PAGES        distinct MMIO pages, 2..16 (one page hides in KVM's
 *                per-vCPU MMIO cache)
 *   PAGE         their stride (4096)
 *   SIGNAL_PORT  the port the guest signals the VMM on
 *   COALESCED    0: the exit loop, 1: the coalesced batch loop
 *   READS        exit loop: read one byte of each page
 *   WRITES       exit loop: write one byte of each page
 *   SPIN         iterations of a busy loop after each access (0: none):
 *                a guest that computes between device accesses, which
 *                sets the access rate without the VMM's help
 *
 * Header (16 bytes at the image start, little endian): magic "SLSMICRO",
 * u16 version, u16 entry, u16 round, u16 round_end, offsets in the image.
 * round..round_end is the coalesced loop's unrolled round (PAGES writes of
 * equal length; both 0 in the exit loop): the VMM enters it part way to do
 * a partial round.
 */
	.code16
	.text
	.globl	_start
_start:
header:
	.ascii	"SLSMICRO"
	.word	1
	.word	entry - header
.if COALESCED
	.word	round - header, round_end - header
.else
	.word	0, 0
.endif

/* SPIN iterations in DX (free in both loops); the same bytes every time,
 * so the coalesced round's writes stay equal in length. */
.macro	spin
.if SPIN
	movw	$SPIN, %dx
9:	decw	%dx
	jnz	9b
.endif
.endm

entry:
.if COALESCED
/*
 * Batch loop.  "in eax" asks the VMM for a batch: CX (low 16 bits) rounds
 * and, in the high 16, the IP to enter the unrolled round at (a partial
 * first round skips its first writes).  One instruction per write keeps
 * KVM's emulation cost down; BL, the vCPU index, is the byte written, so
 * each coalesced ring entry names its vCPU.
 */
	inl	$SIGNAL_PORT, %eax
	movw	%ax, %cx
	shrl	$16, %eax
	jmp	*%ax
round:
	page = 0
	.rept	PAGES
	movb	%bl, %es:(page * PAGE)
	spin
	page = page + 1
	.endr
round_end:
	loop	round
	jmp	entry
.else
/*
 * Exit loop: for each page, read and/or write one byte at ES:BX, then
 * "out" once per round so the VMM sees the rounds.  Every access exits to
 * the VMM (KVM_EXIT_MMIO).
 */
	xorw	%bx, %bx
	movw	$PAGES, %cx
1:
.if READS
	movb	%es:(%bx), %al
.endif
.if WRITES
	movb	%al, %es:(%bx)
.endif
	spin
	addw	$PAGE, %bx
	loop	1b
	outb	%al, $SIGNAL_PORT
	jmp	entry
.endif
