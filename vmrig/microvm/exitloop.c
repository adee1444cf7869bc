/* The micro-VMM's exit loop in C (``--native``): KVM_RUN and the count of
 * every exit, as loops.exit_loop does in Python, at the exit rate the host
 * (or the nested L1) allows rather than the rate Python's interpreter does.
 *
 * Python sets up the VM, applies memslot changes and writes the truth; it
 * calls this loop to run until ``stop_at`` MMIO exits (the next scheduled
 * change, or the end), then applies the change and calls again.  Counts
 * accumulate in ``struct counts`` across calls; ctypes releases the GIL
 * for the call.  Built by vmrig/microvm/native.py with the system's cc.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#define MAX_PAGES 16

struct counts {
	int64_t n;                   /* MMIO exits */
	int64_t reads, writes, completed, pio;
	int64_t by_page[MAX_PAGES][2]; /* [page][is_write] */
	int64_t last_was_read;
	uint64_t bad_gpa;            /* the address, when the loop returns BAD_GPA */
};

enum { DONE = 0, DEADLINE = -10000, BAD_GPA = -10001 };

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Returns DONE at stop_at MMIO exits, DEADLINE once deadline_ns (monotonic;
 * 0: none) has passed, BAD_GPA, -errno of a failed KVM_RUN, or the KVM exit
 * reason (> 0) of any other exit, which the caller reports. */
int exit_loop(int vcpu, struct kvm_run *run, uint64_t mmio_gpa, int pages,
	      int64_t stop_at, int64_t deadline_ns, struct counts *c)
{
	while (c->n < stop_at) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (run->exit_reason == KVM_EXIT_MMIO) {
			uint64_t page = (run->mmio.phys_addr - mmio_gpa) >> 12;
			if (c->last_was_read)
				c->completed++;
			if (run->mmio.phys_addr < mmio_gpa || page >= (uint64_t)pages) {
				c->bad_gpa = run->mmio.phys_addr;
				return BAD_GPA;
			}
			c->by_page[page][run->mmio.is_write ? 1 : 0]++;
			if (run->mmio.is_write) {
				c->writes++;
				c->last_was_read = 0;
			} else {
				c->reads++;
				c->last_was_read = 1;
			}
			c->n++;
			if (deadline_ns && (c->n & 0x3ff) == 0 && now_ns() >= deadline_ns)
				return DEADLINE;
		} else if (run->exit_reason == KVM_EXIT_IO) {
			if (c->last_was_read)
				c->completed++;
			c->last_was_read = 0;
			c->pio++;
		} else {
			return (int)run->exit_reason;
		}
	}
	return DONE;
}
