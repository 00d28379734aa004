/*
 * sockio.c - see sockio.h. Runs on the worker that owns the socket.
 *
 * The one idea: a read that may be small goes to the stack first. Reading
 * straight into an empty evbuffer's reserved space makes the buffer allocate a
 * chain for the whole `chunk` (16 KiB asked, a 32 KiB block), which evhttp or
 * the parser frees again once the message is consumed: two such blocks per
 * proxied request kept jemalloc in its slow paths (its thread cache is
 * garbage-collected every 64 KiB allocated, then flushed and refilled): about
 * 3,200 instructions a request for a 1 KiB answer (callgrind). Copied out of
 * the stack, a message gets a chain of its own size. Only a read that fills
 * the scratch (a large transfer) goes on straight into the buffer, so a bulk
 * stream copies at most one scratch's worth per call.
 */
#include "gateway/sockio.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <event2/buffer.h>

#define SOCKIO_SCRATCH_BYTES (16 * 1024) /* stack buffer for the first read of a call */
#define SOCKIO_WRITE_VECS 64             /* pieces of a buffer one sendmsg takes */

/* One recv into the stack, appended to buf. recv's result, or -2 (errno
 * ENOMEM) when what was read cannot be kept. */
static ssize_t read_via_scratch(int fd, struct evbuffer *buf, size_t want)
{
    char scratch[SOCKIO_SCRATCH_BYTES];
    if (want > sizeof scratch)
        want = sizeof scratch;
    ssize_t r = recv(fd, scratch, want, 0);
    if (r > 0 && evbuffer_add(buf, scratch, (size_t)r) != 0) {
        errno = ENOMEM;
        return -2; /* the bytes are lost: the connection cannot go on */
    }
    return r;
}

/* One readv straight into buf's free space (at most two extents). */
static ssize_t read_direct(int fd, struct evbuffer *buf, size_t chunk, int vecs, size_t *want)
{
    struct evbuffer_iovec v[2];
    int nv = evbuffer_reserve_space(buf, (ev_ssize_t)chunk, v, vecs < 1 ? 1 : vecs > 2 ? 2 : vecs);
    if (nv <= 0) {
        errno = ENOMEM;
        return -2;
    }
    struct iovec iov[2];
    *want = 0;
    for (int i = 0; i < nv; i++) {
        iov[i].iov_base = v[i].iov_base;
        iov[i].iov_len = v[i].iov_len;
        *want += v[i].iov_len;
    }
    ssize_t r = readv(fd, iov, nv);
    size_t left = r > 0 ? (size_t)r : 0;
    for (int i = 0; i < nv; i++) {
        v[i].iov_len = left < v[i].iov_len ? left : v[i].iov_len;
        left -= v[i].iov_len;
    }
    int saved = errno;
    evbuffer_commit_space(buf, v, r > 0 ? nv : 0);
    errno = saved;
    return r;
}

gw_read_result gw_read_socket(int fd, struct evbuffer *buf, size_t chunk, int vecs, size_t limit, bool to_eof,
                              size_t *got)
{
    *got = 0;
    bool bulk = false; /* a read filled the scratch: the rest goes straight into buf */
    while (evbuffer_get_length(buf) < limit) {
        size_t want = chunk;
        ssize_t r = bulk ? read_direct(fd, buf, chunk, vecs, &want) : read_via_scratch(fd, buf, chunk);
        if (r == -2)
            return GW_READ_ERROR;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? GW_READ_DRAINED : GW_READ_ERROR;
        }
        *got += (size_t)r;
        if (r == 0)
            return GW_READ_EOF;
        if (!bulk) {
            want = chunk < SOCKIO_SCRATCH_BYTES ? chunk : SOCKIO_SCRATCH_BYTES;
            bulk = (size_t)r == want;
        }
        if ((size_t)r < want && !to_eof)
            return GW_READ_DRAINED; /* the next arrival raises a new edge */
    }
    return GW_READ_LIMIT;
}

ssize_t gw_write_socket(int fd, struct evbuffer *buf)
{
    struct evbuffer_iovec v[SOCKIO_WRITE_VECS];
    int n = evbuffer_peek(buf, -1, NULL, v, SOCKIO_WRITE_VECS);
    if (n <= 0)
        return 0;
    if (n > SOCKIO_WRITE_VECS)
        n = SOCKIO_WRITE_VECS;
    ssize_t w;
    if (n == 1) {
        w = send(fd, v[0].iov_base, v[0].iov_len, MSG_NOSIGNAL);
    } else {
        struct iovec iov[SOCKIO_WRITE_VECS];
        for (int i = 0; i < n; i++) {
            iov[i].iov_base = v[i].iov_base;
            iov[i].iov_len = v[i].iov_len;
        }
        /* sendmsg rather than writev: the socket layer directly, without the
         * file layer's checks and notifications around it. */
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    }
    if (w > 0)
        evbuffer_drain(buf, (size_t)w);
    return w;
}
