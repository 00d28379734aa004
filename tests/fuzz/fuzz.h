/*
 * fuzz.h - what the libFuzzer targets in tests/fuzz/ share: FUZZ_CHECK for
 * their invariants, the entry point's prototype and, with -DGW_FUZZ_REPLAY
 * (CMake's <name>_replay programs), a main() that runs the files and
 * directories named on its command line through the target once each, so any
 * compiler can replay a seed corpus as a regression test.
 *
 * A target defines FUZZ_NAME (its program's name, for messages) before
 * including this header. The header defines main() under GW_FUZZ_REPLAY, so
 * it is included by the target's one source file only.
 */
#ifndef GATEWAY_TESTS_FUZZ_H
#define GATEWAY_TESTS_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef FUZZ_NAME
#error "define FUZZ_NAME before including tests/fuzz/fuzz.h"
#endif

/* A broken invariant: say which and abort, so libFuzzer keeps the input. The
 * checks do not use assert(): CMake's release builds define NDEBUG. */
#define FUZZ_CHECK(cond)                                                                                     \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "%s: invariant broken at line %d: %s\n", FUZZ_NAME, __LINE__, #cond);            \
            abort();                                                                                         \
        }                                                                                                    \
    } while (0)

/* The target: one input, data[0..size), borrowed for the call. Returns 0. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#ifdef GW_FUZZ_REPLAY
#include <dirent.h>
#include <sys/stat.h>

#define FUZZ_REPLAY_MAX_BYTES (1024 * 1024) /* a seed larger than this is a mistake */

/* Run one file through the target; false when it cannot be read. */
static bool fuzz_replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = malloc(FUZZ_REPLAY_MAX_BYTES);
    size_t n = 0;
    bool ok = false;

    if (f == NULL || buf == NULL) {
        fprintf(stderr, "%s: cannot read %s\n", FUZZ_NAME, path);
        goto fail;
    }
    n = fread(buf, 1, FUZZ_REPLAY_MAX_BYTES, f);
    if (ferror(f)) {
        fprintf(stderr, "%s: cannot read %s\n", FUZZ_NAME, path);
        goto fail;
    }
    LLVMFuzzerTestOneInput(buf, n);
    ok = true;
fail:
    if (f != NULL)
        fclose(f);
    free(buf);
    return ok;
}

/* Each argument is an input file or a directory of them (not recursive).
 * Exits 1 when an argument cannot be read or names no input at all. */
int main(int argc, char **argv)
{
    size_t runs = 0;
    for (int a = 1; a < argc; a++) {
        struct stat st;
        if (stat(argv[a], &st) != 0) {
            fprintf(stderr, "%s: %s: no such file or directory\n", FUZZ_NAME, argv[a]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (!fuzz_replay_file(argv[a]))
                return 1;
            runs++;
            continue;
        }
        DIR *d = opendir(argv[a]);
        if (d == NULL) {
            fprintf(stderr, "%s: cannot open %s\n", FUZZ_NAME, argv[a]);
            return 1;
        }
        for (struct dirent *e; (e = readdir(d)) != NULL;) {
            char path[4096];
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof path, "%s/%s", argv[a], e->d_name);
            if (!fuzz_replay_file(path)) {
                closedir(d);
                return 1;
            }
            runs++;
        }
        closedir(d);
    }
    if (runs == 0) {
        fprintf(stderr, "usage: %s FILE-OR-DIR...: no inputs replayed\n", argv[0]);
        return 1;
    }
    printf("%s: %zu inputs replayed, all invariants held\n", FUZZ_NAME, runs);
    return 0;
}
#endif

#endif
