/*
 * seedcheck: a checker of seeded data in tmpfs, for zapvm's Linux guest (built and packed into
 * the initramfs by resources/linux-guest/build.sh; /init starts it for zapvm.seedcheck=MIB).
 *
 *   seedcheck FILE MIB SEED REPORT_SECONDS
 *
 * Writes MIB MiB of data derived from SEED into FILE (a tmpfs file: page cache pages the guest
 * owns for the whole run), maps it read-only and re-verifies every word of it in a loop, forever.
 * Each 4 KiB page holds: word 0 the marker SEEDCHECK_MARKER, word 1 the page's index in the file,
 * word 2 the seed, and in every other word w the value mix(seed, page, w) (a splitmix64 step), so
 * a mismatch names the page, the word, what it holds and what it should. A page of zeros (one the
 * host discarded although the guest owned it) or a stale page (another page's contents) fails.
 *
 * Every line it prints starts with "zapvm-guest: ":
 *   "zapvm-guest: seedcheck ready mib=M seed=S pages=P"           once the data is written
 *   "zapvm-guest: seedcheck pass=N mib=M verified_bytes=B ok"     every REPORT_SECONDS, and the
 *                                                                 totals so far
 *   "zapvm-guest: FAIL seedcheck pass=N page=P word=W holds=0x... expected=0x..."
 *                                                                 the first bad word of each bad
 *                                                                 page (at most 8 lines a pass),
 *   "zapvm-guest: FAIL seedcheck pass=N bad_pages=K"              then, after that pass, its total;
 *                                                                 it exits with status 1
 * The verification runs in user mode only (no system call per page), which is native speed even
 * where the guest kernel is emulated; it runs at nice 19 and sleeps 200 ms between passes, so
 * that the guest's kernel (its balloon driver, page reporting) gets the CPU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define SEEDCHECK_MARKER UINT64_C(0x6b63656864656573) /* "seedchek" little-endian */
#define MAX_FAIL_LINES 8

static uint64_t mix(uint64_t seed, uint64_t page, uint64_t word) {
    uint64_t z = seed ^ (page * UINT64_C(0x9e3779b97f4a7c15)) ^ (word * UINT64_C(0xd1b54a32d192ed03));
    z += UINT64_C(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t expected(uint64_t seed, uint64_t page, uint64_t word) {
    switch (word) {
    case 0: return SEEDCHECK_MARKER;
    case 1: return page;
    case 2: return seed;
    default: return mix(seed, page, word);
    }
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail_setup(const char *what) {
    printf("zapvm-guest: FAIL seedcheck setup: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5) {
        fprintf(stderr, "usage: seedcheck FILE MIB SEED REPORT_SECONDS\n");
        return 2;
    }
    const char *path = argv[1];
    uint64_t mib = strtoull(argv[2], NULL, 0);
    uint64_t seed = strtoull(argv[3], NULL, 0);
    double period = strtod(argv[4], NULL);
    if (mib == 0 || period <= 0) {
        fprintf(stderr, "seedcheck: MIB and REPORT_SECONDS must be positive\n");
        return 2;
    }
    /* The lowest priority: the guest kernel's own work (its balloon driver, page reporting)
     * comes first. */
    errno = 0;
    if (nice(19) == -1 && errno != 0) return fail_setup("nice");
    uint64_t pages = mib * ((1u << 20) / PAGE);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return fail_setup("open");
    /* Written through write(2) in 64 KiB pieces; the buffer is zeroed before it is freed, so that
     * the file's pages are the only copies of the data in guest memory. */
    static uint64_t buf[16 * WORDS];
    for (uint64_t p = 0; p < pages; p += 16) {
        uint64_t n = pages - p < 16 ? pages - p : 16;
        for (uint64_t i = 0; i < n; i++)
            for (uint64_t w = 0; w < WORDS; w++) buf[i * WORDS + w] = expected(seed, p + i, w);
        size_t len = n * PAGE, done = 0;
        while (done < len) {
            ssize_t r = write(fd, (char *)buf + done, len - done);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return fail_setup("write");
            done += (size_t)r;
        }
    }
    memset(buf, 0, sizeof buf);
    const uint64_t *data = mmap(NULL, pages * PAGE, PROT_READ, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED) return fail_setup("mmap");
    printf("zapvm-guest: seedcheck ready mib=%" PRIu64 " seed=%" PRIu64 " pages=%" PRIu64 "\n", mib, seed, pages);
    uint64_t pass = 0, verified = 0;
    double next_report = now_s() + period;
    const struct timespec pause = {0, 200 * 1000 * 1000};
    for (;;) {
        pass++;
        uint64_t bad_pages = 0;
        for (uint64_t p = 0; p < pages; p++) {
            const uint64_t *page = data + p * WORDS;
            for (uint64_t w = 0; w < WORDS; w++) {
                uint64_t want = expected(seed, p, w);
                if (page[w] != want) {
                    if (bad_pages < MAX_FAIL_LINES)
                        printf("zapvm-guest: FAIL seedcheck pass=%" PRIu64 " page=%" PRIu64 " word=%" PRIu64
                               " holds=0x%016" PRIx64 " expected=0x%016" PRIx64 "\n",
                               pass, p, w, page[w], want);
                    bad_pages++;
                    break;
                }
            }
        }
        if (bad_pages) {
            printf("zapvm-guest: FAIL seedcheck pass=%" PRIu64 " bad_pages=%" PRIu64 "\n", pass, bad_pages);
            return 1;
        }
        verified += pages * PAGE;
        double t = now_s();
        if (t >= next_report) {
            printf("zapvm-guest: seedcheck pass=%" PRIu64 " mib=%" PRIu64 " verified_bytes=%" PRIu64 " ok\n", pass,
                   mib, verified);
            next_report = t + period;
        }
        nanosleep(&pause, NULL);
    }
}
