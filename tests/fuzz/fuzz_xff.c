/*
 * fuzz_xff.c - libFuzzer target for the X-Forwarded-For walk behind the rate
 * limiter's client address (gw_forwarded_for_walk, gateway/httputil.c).
 *
 * The first byte picks the trusted blocks (bits 0-1: none, IPv4 blocks, IPv6
 * blocks, or everything) and the size of a second, small output buffer (bits
 * 2-7: 0 to 63 bytes); the rest, cut at its first NUL, is the header value.
 * What must hold, whatever the input:
 *   - the output is NUL-terminated within its size, and a buffer of exactly
 *     that size is never written past (ASan sees it: it is malloc'd exactly);
 *   - the output is empty, a substring of the input, or the canonical
 *     spelling (inet_ntop's) of an address that is one of the input's hops
 *     once blanks, brackets and a port are gone;
 *   - a small buffer gets the same answer and the first size - 1 bytes of
 *     what a large one gets;
 *   - true only when the output is trusted (or the value is empty);
 *   - the walk never looks left of where it stopped: hops added on the left
 *     change nothing once it has said false; after true, it goes on to them
 *     (unless the first hop was blank: passed over at the left end, it
 *     stops the walk once it is in the middle).
 *
 * Built by scripts/fuzz.sh (GATEWAY_FUZZ, clang -fsanitize=fuzzer); every
 * build also replays the seed corpus, tests/fuzz/corpus/xff/ (see fuzz.h).
 */
#define FUZZ_NAME "fuzz_xff"
#include "tests/fuzz/fuzz.h"

#include <arpa/inet.h>
#include <string.h>

#include "gateway/httputil.h"
#include "gateway/runtime.h"

#define OUT_LARGE 64       /* more than any hop the walk takes (INET6_ADDRSTRLEN) */
#define LEFT_HOP "1.1.1.1" /* the hop added on the left; trusted only by 0/0 */

/* The trusted block lists, picked by the first byte's two low bits. */
static gw_cidr v4_blocks[3], v6_blocks[2], all_blocks[2];
static const struct {
    const gw_cidr *blocks;
    size_t count;
} LISTS[4] = {{NULL, 0}, {v4_blocks, 3}, {v6_blocks, 2}, {all_blocks, 2}};

static void block(gw_cidr *c, int family, const char *addr, int bits)
{
    memset(c, 0, sizeof *c);
    c->family = family;
    c->bits = bits;
    FUZZ_CHECK(inet_pton(family, addr, c->bytes) == 1);
}

static void init_blocks(void)
{
    static bool done;
    if (done)
        return;
    block(&v4_blocks[0], AF_INET, "10.0.0.0", 8);
    block(&v4_blocks[1], AF_INET, "192.168.0.0", 16);
    block(&v4_blocks[2], AF_INET, "127.0.0.1", 32);
    block(&v6_blocks[0], AF_INET6, "fd00::", 8);
    block(&v6_blocks[1], AF_INET6, "::1", 128);
    block(&all_blocks[0], AF_INET, "0.0.0.0", 0);
    block(&all_blocks[1], AF_INET6, "::", 0);
    done = true;
}

/* The address in one hop text[0..len) (blanks, then "[v6]..." or a single
 * ":port" ignored) into bytes; its family, or 0 when it is no address. */
static int hop_address(const char *text, size_t len, unsigned char *bytes)
{
    char buf[128];
    while (len > 0 && (*text == ' ' || *text == '\t'))
        text++, len--;
    while (len > 0 && (text[len - 1] == ' ' || text[len - 1] == '\t'))
        len--;
    if (len == 0 || len >= sizeof buf)
        return 0;
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *addr = buf;
    if (buf[0] == '[' && strchr(buf, ']')) {
        addr = buf + 1;
        *strchr(addr, ']') = '\0';
    } else if (strchr(buf, ':') && strchr(buf, ':') == strrchr(buf, ':')) {
        *strchr(buf, ':') = '\0';
    }
    int family = strchr(addr, ':') ? AF_INET6 : AF_INET;
    return inet_pton(family, addr, bytes) == 1 ? family : 0;
}

/* Is out the canonical spelling of an address that is one of header's hops? */
static bool is_canonical_hop(const char *header, const char *out)
{
    unsigned char want[16], got[16];
    char spelled[INET6_ADDRSTRLEN];
    int family = strchr(out, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(family, out, want) != 1 || !inet_ntop(family, want, spelled, sizeof spelled) ||
        strcmp(spelled, out) != 0)
        return false;
    size_t addr_len = family == AF_INET ? 4 : 16;
    for (const char *p = header;;) {
        size_t n = strcspn(p, ",");
        if (hop_address(p, n, got) == family && memcmp(got, want, addr_len) == 0)
            return true;
        if (p[n] == '\0')
            return false;
        p += n + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    init_blocks();
    const gw_cidr *blocks = LISTS[data[0] & 3].blocks;
    size_t count = LISTS[data[0] & 3].count;
    size_t small_size = data[0] >> 2;
    size_t len = size - 1;
    char *header = malloc(len + 1);
    char *left = malloc(len + sizeof LEFT_HOP + 2);
    char *small = malloc(small_size ? small_size : 1);
    char large[OUT_LARGE];
    if (!header || !left || !small)
        goto done;
    memcpy(header, data + 1, len);
    header[len] = '\0';
    len = strlen(header);

    /* A large buffer: what the gateway passes. */
    large[0] = '\0';
    bool trusted_all = gw_forwarded_for_walk(blocks, count, header, large, sizeof large);
    size_t out_len = strnlen(large, sizeof large);
    FUZZ_CHECK(out_len <= INET6_ADDRSTRLEN); /* the longest hop taken */
    FUZZ_CHECK(out_len == 0 || strstr(header, large) != NULL || is_canonical_hop(header, large));
    if (trusted_all)
        FUZZ_CHECK(len == 0 ? out_len == 0 : gw_cidr_match(blocks, count, large));
    else
        FUZZ_CHECK(len > 0);

    /* The same walk into a small buffer: the same answer, the output cut. */
    if (small_size)
        small[0] = '\0';
    else
        small[0] = 'x'; /* size 0: must stay as it is */
    FUZZ_CHECK(gw_forwarded_for_walk(blocks, count, header, small, small_size) == trusted_all);
    if (small_size) {
        size_t cut = out_len < small_size - 1 ? out_len : small_size - 1;
        FUZZ_CHECK(strnlen(small, small_size) == cut);
        FUZZ_CHECK(memcmp(small, large, cut) == 0);
    } else {
        FUZZ_CHECK(small[0] == 'x');
    }

    /* A hop added on the left: seen only when every hop was trusted. */
    if (len > 0)
        snprintf(left, len + sizeof LEFT_HOP + 2, "%s, %s", LEFT_HOP, header);
    else
        snprintf(left, len + sizeof LEFT_HOP + 2, "%s", LEFT_HOP); /* ", " would add an empty hop */
    char again[OUT_LARGE];
    memcpy(again, large, out_len + 1);
    bool trusted_left = gw_forwarded_for_walk(blocks, count, left, again, sizeof again);
    size_t first = strcspn(header, ",");
    bool blank_first = header[first] == ',' && strspn(header, " \t") == first;
    if (trusted_all && blank_first) {
        /* A blank first hop is passed over at the left end, but in the
         * middle it is malformed: the walk stops there. */
        FUZZ_CHECK(!trusted_left);
        FUZZ_CHECK(strcmp(again, large) == 0);
    } else if (trusted_all) {
        FUZZ_CHECK(strcmp(again, LEFT_HOP) == 0);
        FUZZ_CHECK(trusted_left == gw_cidr_match(blocks, count, LEFT_HOP));
    } else {
        FUZZ_CHECK(!trusted_left);
        FUZZ_CHECK(strcmp(again, large) == 0);
    }

done:
    free(header);
    header = NULL;
    free(left);
    left = NULL;
    free(small);
    small = NULL;
    return 0;
}
