/*
 * churn: allocate-and-free churn for zapvm's Linux guest, so that free page reporting has free
 * memory to report (built and packed into the initramfs by resources/linux-guest/build.sh; /init
 * starts it for zapvm.churn=MIB).
 *
 *   churn MIB SEED REPORT_SECONDS PAUSE_MS
 *
 * Forever, one round at a time: maps MIB MiB of anonymous memory (MAP_POPULATE: the kernel
 * faults it all in with one system call), writes every word of it with a value derived from SEED,
 * the round and the word's place (a splitmix64 step), verifies every word, unmaps it, and sleeps
 * PAUSE_MS. The unmapped pages go back to the guest's buddy allocator, where they merge into
 * free blocks of page_reporting_order; Linux's page_reporting reports such blocks ~2 s after they
 * are freed, so PAUSE_MS should be longer than that (the pages are taken again by the next
 * round). Its verification makes it a checker too: a page the host discarded or replaced while
 * churn owned it fails the round.
 *
 * Every line it prints starts with "zapvm-guest: ":
 *   "zapvm-guest: churn started mib=M seed=S pause_ms=P"
 *   "zapvm-guest: churn round=N mib=M churned_bytes=B short_rounds=K ok"
 *        every REPORT_SECONDS: rounds so far, bytes allocated, written, verified and freed
 *        (B), and rounds that could not map their memory (K: the guest was short of memory,
 *        e.g. under a balloon target toward OOM; such a round maps nothing and is retried)
 *   "zapvm-guest: FAIL churn round=N page=P word=W holds=0x... expected=0x..."
 *        the first bad word of the first bad page; it exits with status 1
 * It runs at nice 19, so that the guest's kernel (its balloon driver, page reporting) comes
 * first.
 */
#define _GNU_SOURCE
#include <errno.h>
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

static uint64_t mix(uint64_t seed, uint64_t round, uint64_t index) {
    uint64_t z = seed ^ (round * UINT64_C(0xd1b54a32d192ed03)) ^ (index * UINT64_C(0x9e3779b97f4a7c15));
    z += UINT64_C(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5) {
        fprintf(stderr, "usage: churn MIB SEED REPORT_SECONDS PAUSE_MS\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 0);
    uint64_t seed = strtoull(argv[2], NULL, 0);
    double period = strtod(argv[3], NULL);
    long pause_ms = strtol(argv[4], NULL, 0);
    if (mib == 0 || period <= 0 || pause_ms < 0) {
        fprintf(stderr, "churn: MIB and REPORT_SECONDS must be positive, PAUSE_MS not negative\n");
        return 2;
    }
    errno = 0;
    if (nice(19) == -1 && errno != 0) {
        printf("zapvm-guest: FAIL churn setup: nice: %s\n", strerror(errno));
        return 1;
    }
    size_t len = (size_t)(mib << 20);
    uint64_t words = len / 8, round = 0, churned = 0, short_rounds = 0;
    const struct timespec pause = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
    printf("zapvm-guest: churn started mib=%" PRIu64 " seed=%" PRIu64 " pause_ms=%ld\n", mib, seed, pause_ms);
    double next_report = now_s() + period;
    for (;;) {
        round++;
        uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED) {
            short_rounds++;
        } else {
            for (uint64_t i = 0; i < words; i++) p[i] = mix(seed, round, i);
            for (uint64_t i = 0; i < words; i++) {
                uint64_t want = mix(seed, round, i);
                if (p[i] != want) {
                    printf("zapvm-guest: FAIL churn round=%" PRIu64 " page=%" PRIu64 " word=%" PRIu64
                           " holds=0x%016" PRIx64 " expected=0x%016" PRIx64 "\n",
                           round, i / WORDS, i % WORDS, p[i], want);
                    return 1;
                }
            }
            munmap(p, len);
            churned += len;
        }
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
