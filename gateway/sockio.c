/*
 * sockio.c - see sockio.h. Runs on the worker that owns the socket.
 */
#include "gateway/sockio.h"

#include <errno.h>
#include <sys/uio.h>

#include <event2/buffer.h>

gw_read_result gw_read_socket(int fd, struct evbuffer *buf, size_t chunk, int vecs, size_t limit, bool to_eof,
                              size_t *got)
{
    *got = 0;
    while (evbuffer_get_length(buf) < limit) {
        struct evbuffer_iovec v[2];
        int nv = evbuffer_reserve_space(buf, (ev_ssize_t)chunk, v, vecs < 1 ? 1 : vecs > 2 ? 2 : vecs);
        if (nv <= 0) {
            errno = ENOMEM;
            return GW_READ_ERROR;
        }
        struct iovec iov[2];
        size_t want = 0;
        for (int i = 0; i < nv; i++) {
            iov[i].iov_base = v[i].iov_base;
            iov[i].iov_len = v[i].iov_len;
            want += v[i].iov_len;
        }
        ssize_t r = readv(fd, iov, nv);
        if (r < 0) {
            evbuffer_commit_space(buf, v, 0);
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? GW_READ_DRAINED : GW_READ_ERROR;
        }
        size_t left = (size_t)r;
        for (int i = 0; i < nv; i++) {
            v[i].iov_len = left < v[i].iov_len ? left : v[i].iov_len;
            left -= v[i].iov_len;
        }
        evbuffer_commit_space(buf, v, nv);
        *got += (size_t)r;
        if (r == 0)
            return GW_READ_EOF;
        if ((size_t)r < want && !to_eof)
            return GW_READ_DRAINED; /* the next arrival raises a new edge */
    }
    return GW_READ_LIMIT;
}
