/*
 * slotscope Linux-guest MMIO loop: the bare guest's workload as a program.
 *
 * Maps BAR0 of QEMU's "edu" device (1234:11e8, 1 MiB of MMIO) through sysfs
 * and loops forever over a read and a write on each of NPAGES distinct pages
 * (>= 2: KVM's per-vCPU MMIO cache hides a loop on one address).  Without an
 * edu device it maps the unbacked range at MMIO_BASE through /dev/mem.
 *
 *   mmio [NPAGES [MMIO_BASE]]
 *
 * Prints "mmio: ..." once, then the loop count every 2^20 rounds.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static int read_hex(const char *dir, const char *name, unsigned long *val)
{
	char path[512], buf[64];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "r");
	if (!f)
		return -1;
	if (!fgets(buf, sizeof(buf), f)) {
		fclose(f);
		return -1;
	}
	fclose(f);
	*val = strtoul(buf, NULL, 16);
	return 0;
}

static volatile uint32_t *map_edu(unsigned long npages, char *what, size_t n)
{
	const char *root = "/sys/bus/pci/devices";
	struct dirent *de;
	DIR *d = opendir(root);
	void *p = MAP_FAILED;

	if (!d)
		return NULL;
	while ((de = readdir(d))) {
		char dir[512], path[600];
		unsigned long vendor, device;
		int fd;

		if (de->d_name[0] == '.')
			continue;
		snprintf(dir, sizeof(dir), "%s/%s", root, de->d_name);
		if (read_hex(dir, "vendor", &vendor) || read_hex(dir, "device", &device))
			continue;
		if (vendor != 0x1234 || device != 0x11e8)
			continue;
		snprintf(path, sizeof(path), "%s/enable", dir);
		fd = open(path, O_WRONLY);
		if (fd >= 0) {
			if (write(fd, "1", 1) != 1)
				perror("enable");
			close(fd);
		}
		snprintf(path, sizeof(path), "%s/resource0", dir);
		fd = open(path, O_RDWR | O_SYNC);
		if (fd < 0)
			continue;
		p = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd);
		if (p != MAP_FAILED) {
			snprintf(what, n, "edu BAR0 of %s", de->d_name);
			break;
		}
	}
	closedir(d);
	return p == MAP_FAILED ? NULL : p;
}

int main(int argc, char **argv)
{
	unsigned long npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 4;
	unsigned long base = argc > 2 ? strtoul(argv[2], NULL, 0) : 0xc0000000UL;
	volatile uint32_t *mmio;
	char what[300] = "";
	uint64_t rounds = 0;
	uint32_t sink = 0;

	if (npages < 2 || npages > 256) {
		fprintf(stderr, "mmio: NPAGES must be 2..256\n");
		return 2;
	}
	mmio = map_edu(npages, what, sizeof(what));
	if (!mmio) {
		int fd = open("/dev/mem", O_RDWR | O_SYNC);
		void *p;

		if (fd < 0) {
			perror("mmio: /dev/mem");
			return 1;
		}
		p = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, base);
		close(fd);
		if (p == MAP_FAILED) {
			perror("mmio: mmap /dev/mem");
			return 1;
		}
		mmio = p;
		snprintf(what, sizeof(what), "/dev/mem at %#lx", base);
	}
	printf("mmio: %lu pages, %s\n", npages, what);
	fflush(stdout);
	for (;;) {
		for (unsigned long i = 0; i < npages; i++) {
			/* Offset 0x100 of the edu BAR is an unused register. */
			sink += mmio[(i * PAGE + 0x100) / 4];
			mmio[(i * PAGE + 0x108) / 4] = (uint32_t)rounds;
		}
		if (!(++rounds & ((1 << 20) - 1))) {
			printf("mmio: %llu rounds\n", (unsigned long long)rounds);
			fflush(stdout);
		}
	}
	return (int)sink;
}
