/*
 * churn: allocate-and-free churn for zapvm's Linux guest, so that free page reporting has free
 * memory to report (built and packed into the initramfs by resources/linux-guest/build.sh; /init
 * starts it for zapvm.churn=MIB).
 *
 *   churn FILE MIB REPORT_SECONDS PAUSE_MS
 *
 * Forever, one round at a time: allocates MIB MiB of page cache for FILE (a tmpfs file) with
 * fallocate(2), checks that the file holds that much memory (its st_blocks), frees it all with
 * ftruncate(2), and sleeps PAUSE_MS. fallocate on tmpfs neither zeroes nor copies the pages it
 * allocates (they are zeroed only if read), so a round costs the guest kernel its page
 * allocations and frees and nothing per byte: where guest ring 0 is emulated (PVM hosts), zeroing
 * anonymous memory costs tens of milliseconds a page. The freed pages go back to the guest's
 * buddy allocator, where they merge into free blocks of page_reporting_order; Linux's
 * page_reporting reports such blocks ~2 s after they are freed, so PAUSE_MS should be longer than
 * that (the next round takes pages again).
 *
 * Every line it prints starts with "zapvm-guest: ":
 *   "zapvm-guest: churn started mib=M pause_ms=P"
 *   "zapvm-guest: churn round=N mib=M churned_bytes=B short_rounds=K ok"
 *        every REPORT_SECONDS: rounds so far, bytes allocated and freed (B), and rounds that
 *        could not allocate all their memory (K: fallocate failed, the guest was short of memory,
 *        e.g. under a balloon target toward OOM; what it got is freed and the round retried)
 *   "zapvm-guest: FAIL churn ..."   it cannot work (its file cannot be made, or the kernel said
 *        it allocated memory the file does not hold); it exits with status 1
 * It runs at nice 19, so that the guest's kernel (its balloon driver, page reporting) comes
 * first.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(const char *what) {
    printf("zapvm-guest: FAIL churn %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5) {
        fprintf(stderr, "usage: churn FILE MIB REPORT_SECONDS PAUSE_MS\n");
        return 2;
    }
    const char *path = argv[1];
    uint64_t mib = strtoull(argv[2], NULL, 0);
    double period = strtod(argv[3], NULL);
    long pause_ms = strtol(argv[4], NULL, 0);
    if (mib == 0 || period <= 0 || pause_ms < 0) {
        fprintf(stderr, "churn: MIB and REPORT_SECONDS must be positive, PAUSE_MS not negative\n");
        return 2;
    }
    errno = 0;
    if (nice(19) == -1 && errno != 0) return fail("setup: nice");
    off_t len = (off_t)(mib << 20);
    uint64_t round = 0, churned = 0, short_rounds = 0;
    const struct timespec pause = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return fail("setup: open");
    printf("zapvm-guest: churn started mib=%" PRIu64 " pause_ms=%ld\n", mib, pause_ms);
    double next_report = now_s() + period;
    for (;;) {
        round++;
        if (fallocate(fd, 0, 0, len) != 0) {
            if (errno != ENOSPC && errno != ENOMEM && errno != EINTR) return fail("fallocate");
            short_rounds++;
        } else {
            struct stat st;
            if (fstat(fd, &st) != 0) return fail("fstat");
            if ((uint64_t)st.st_blocks * 512 < (uint64_t)len) {
                printf("zapvm-guest: FAIL churn round=%" PRIu64 " holds %" PRIu64 " bytes after allocating %" PRIu64
                       "\n",
                       round, (uint64_t)st.st_blocks * 512, (uint64_t)len);
                return 1;
            }
            churned += (uint64_t)len;
        }
        if (ftruncate(fd, 0) != 0) return fail("ftruncate");
        double t = now_s();
        if (t >= next_report) {
            printf("zapvm-guest: churn round=%" PRIu64 " mib=%" PRIu64 " churned_bytes=%" PRIu64
                   " short_rounds=%" PRIu64 " ok\n",
                   round, mib, churned, short_rounds);
            next_report = t + period;
        }
        nanosleep(&pause, NULL);
    }
}
