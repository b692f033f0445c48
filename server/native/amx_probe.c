/* Does this machine really execute Intel AMX tile instructions in a worker thread?
 *
 * ggml's AMX kernels run in its worker threads after the process asked the kernel for
 * the tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM, as ggml-cpu/amx/amx.cpp does).
 * Some CPUs and VMs report AMX in CPUID, grant that permission, and still fault (SIGILL)
 * on the first tile instruction; this probe does the same steps and reports what happens.
 *
 * Build: cc -O0 -mamx-tile -pthread amx_probe.c -o amx_probe
 * Exit status: 0 tiles work; 3 the kernel refused the tile-data permission;
 *              killed by SIGILL: tile instructions fault (AMX must stay off).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023 /* arch/x86/include/uapi/asm/prctl.h */
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void *use_tiles(void *unused) {
    /* volatile: the config must really be written before ldtilecfg reads it. */
    static volatile struct tile_config config __attribute__((aligned(64)));
    memset((void *)&config, 0, sizeof config);
    config.palette_id = 1;
    config.rows[0] = 16;
    config.colsb[0] = 64;
    _tile_loadconfig((const void *)&config);
    _tile_zero(0);
    _tile_release();
    (void)unused;
    return NULL;
}

int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        puts("amx: tile-data permission refused by the kernel");
        return 3;
    }
    pthread_t worker;
    if (pthread_create(&worker, NULL, use_tiles, NULL) != 0) {
        puts("amx: could not start a thread");
        return 4;
    }
    pthread_join(worker, NULL);
    puts("amx: tile instructions execute");
    return 0;
}
