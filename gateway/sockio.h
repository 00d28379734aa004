/*
 * sockio.h - reading a nonblocking, edge-triggered socket into an evbuffer,
 * and writing an evbuffer out to one.
 *
 * Used by both sides of the proxy (client connections under direct I/O, and
 * upstream connections). No ioctl(FIONREAD) first, as evbuffer_read does: the
 * kernel is simply asked for `chunk` bytes at a time, into a stack buffer that
 * is then appended (so a small message gets a chain of its own size, not one
 * of `chunk`), and once a read fills that, straight into the buffer's free
 * space.
 */
#ifndef GATEWAY_SOCKIO_H
#define GATEWAY_SOCKIO_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct evbuffer;

typedef enum {
    GW_READ_DRAINED, /* EAGAIN, or a short read: nothing more until the next edge */
    GW_READ_LIMIT,   /* buf holds `limit` bytes: stopped with data possibly left */
    GW_READ_EOF,     /* the peer closed its side */
    GW_READ_ERROR    /* errno says why */
} gw_read_result;

/* Read fd into buf until one of the results above. vecs (1 or 2): how many
 * extents of buf's free space one direct readv may fill (1 keeps what one
 * read brings contiguous). to_eof: the peer has closed (EV_CLOSED), so read
 * on past a short read to the end of the stream, since no further edge will
 * come. *got is set to the bytes read. Runs on the thread that owns fd and
 * buf. */
gw_read_result gw_read_socket(int fd, struct evbuffer *buf, size_t chunk, int vecs, size_t limit, bool to_eof,
                              size_t *got);

/* Write what buf holds, as much as the socket takes in one call: send() when
 * it is one piece (a request head, say), else one sendmsg of its first
 * pieces (evbuffer_write would writev, through the file layer). What went is
 * drained from buf. Returns the bytes written, 0 when buf is empty, or -1 with
 * errno (EAGAIN: the socket is full). Runs on the thread that owns fd and buf. */
ssize_t gw_write_socket(int fd, struct evbuffer *buf);

#endif
