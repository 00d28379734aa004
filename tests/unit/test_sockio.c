/*
 * test_sockio.c - reading a nonblocking socket into an evbuffer
 * (gateway/sockio.c): a small message (the stack path), a transfer larger than
 * the stack buffer (which goes on straight into the evbuffer), the limit, end
 * of stream, and to_eof past a short read; writing one piece and many, and
 * into a full socket. Over a socketpair, one thread.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <errno.h>
#include <event2/buffer.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "gateway/sockio.h"

#define CHUNK (16 * 1024)

typedef struct fixture {
    int fd[2]; /* fd[0] is read, fd[1] written */
    struct evbuffer *buf;
} fixture;

static int setup(void **state)
{
    static fixture f;
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, f.fd), 0);
    int big = 1 << 20;
    setsockopt(f.fd[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(f.fd[0], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    assert_int_equal(fcntl(f.fd[0], F_SETFL, O_NONBLOCK), 0);
    f.buf = evbuffer_new();
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    close(f->fd[0]);
    if (f->fd[1] >= 0)
        close(f->fd[1]);
    evbuffer_free(f->buf);
    return 0;
}

/* A byte pattern that shows any reordering or loss. */
static void pattern(unsigned char *p, size_t n, size_t from)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((from + i) * 131 + (from + i) / 251);
}

static void send_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        assert_true(w > 0);
        p += w;
        n -= (size_t)w;
    }
}

static void assert_buffer(struct evbuffer *buf, size_t n)
{
    static unsigned char want[300 * 1024];
    assert_true(n <= sizeof want);
    assert_int_equal(evbuffer_get_length(buf), n);
    pattern(want, n, 0);
    assert_memory_equal(evbuffer_pullup(buf, -1), want, n);
}

static void test_small_message(void **state)
{
    fixture *f = *state;
    unsigned char msg[100];
    pattern(msg, sizeof msg, 0);
    send_all(f->fd[1], msg, sizeof msg);
    size_t got = 0;
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 2, 1 << 20, false, &got), GW_READ_DRAINED);
    assert_int_equal(got, sizeof msg);
    assert_buffer(f->buf, sizeof msg);
    /* Nothing more: EAGAIN, nothing added. */
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 2, 1 << 20, false, &got), GW_READ_DRAINED);
    assert_int_equal(got, 0);
    assert_buffer(f->buf, sizeof msg);
}

static void test_large_transfer(void **state)
{
    fixture *f = *state;
    /* Several chunks' worth: the first read fills the stack buffer, the rest
     * go straight into the evbuffer, in order. */
    static unsigned char data[200 * 1024 + 77];
    pattern(data, sizeof data, 0);
    send_all(f->fd[1], data, sizeof data);
    size_t got = 0;
    for (int vecs = 1; vecs <= 2; vecs++) {
        evbuffer_drain(f->buf, evbuffer_get_length(f->buf));
        if (vecs == 2)
            send_all(f->fd[1], data, sizeof data);
        gw_read_result r = gw_read_socket(f->fd[0], f->buf, CHUNK, vecs, 1 << 20, false, &got);
        assert_true(r == GW_READ_DRAINED);
        assert_int_equal(got, sizeof data);
        assert_buffer(f->buf, sizeof data);
    }
}

static void test_limit(void **state)
{
    fixture *f = *state;
    static unsigned char data[100 * 1024];
    pattern(data, sizeof data, 0);
    send_all(f->fd[1], data, sizeof data);
    size_t got = 0;
    /* Stops once the buffer holds the limit (reads are whole chunks, so it
     * may pass it by less than one), with the rest left in the socket. */
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 1, 40 * 1024, false, &got), GW_READ_LIMIT);
    assert_true(got >= 40 * 1024 && got < 40 * 1024 + CHUNK);
    size_t more = 0;
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 1, 1 << 20, false, &more), GW_READ_DRAINED);
    assert_int_equal(got + more, sizeof data);
    assert_buffer(f->buf, sizeof data);
}

static void test_eof(void **state)
{
    fixture *f = *state;
    unsigned char msg[3000];
    pattern(msg, sizeof msg, 0);
    send_all(f->fd[1], msg, sizeof msg);
    close(f->fd[1]);
    f->fd[1] = -1;
    size_t got = 0;
    /* to_eof: on past the short read to the end of the stream. */
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 2, 1 << 20, true, &got), GW_READ_EOF);
    assert_int_equal(got, sizeof msg);
    assert_buffer(f->buf, sizeof msg);
}

static void test_appends_to_what_is_there(void **state)
{
    fixture *f = *state;
    unsigned char msg[5000];
    pattern(msg, sizeof msg, 0);
    evbuffer_add(f->buf, msg, 1000); /* an earlier read's part of the message */
    send_all(f->fd[1], msg + 1000, sizeof msg - 1000);
    size_t got = 0;
    assert_int_equal(gw_read_socket(f->fd[0], f->buf, CHUNK, 1, 1 << 20, false, &got), GW_READ_DRAINED);
    assert_int_equal(got, sizeof msg - 1000);
    assert_buffer(f->buf, sizeof msg);
}

static void test_error(void **state)
{
    fixture *f = *state;
    size_t got = 0;
    assert_int_equal(gw_read_socket(-1, f->buf, CHUNK, 1, 1 << 20, false, &got), GW_READ_ERROR);
    assert_int_equal(got, 0);
}

/* Read everything the socket holds (blocking until n bytes came). */
static void recv_all(int fd, unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        assert_true(r > 0);
        p += r;
        n -= (size_t)r;
    }
}

static void test_write_one_piece_and_many(void **state)
{
    fixture *f = *state;
    static unsigned char data[64 * 1024], back[64 * 1024];
    pattern(data, sizeof data, 0);
    /* One piece: a send. */
    evbuffer_add(f->buf, data, 300);
    assert_int_equal(gw_write_socket(f->fd[0], f->buf), 300);
    assert_int_equal(evbuffer_get_length(f->buf), 0);
    recv_all(f->fd[1], back, 300);
    assert_memory_equal(back, data, 300);
    /* Several pieces (references, so each is its own chain): a writev, in order. */
    for (size_t off = 0; off < sizeof data; off += 4096)
        evbuffer_add_reference(f->buf, data + off, 4096, NULL, NULL);
    size_t sent = 0;
    while (evbuffer_get_length(f->buf) > 0) {
        ssize_t w = gw_write_socket(f->fd[0], f->buf);
        assert_true(w > 0);
        sent += (size_t)w;
    }
    assert_int_equal(sent, sizeof data);
    recv_all(f->fd[1], back, sizeof data);
    assert_memory_equal(back, data, sizeof data);
    assert_int_equal(gw_write_socket(f->fd[0], f->buf), 0); /* nothing to write */
}

static void test_write_full_socket(void **state)
{
    fixture *f = *state;
    /* fd[0] is nonblocking: once the peer's buffer is full, EAGAIN, and what
     * did not go stays in the buffer. */
    static unsigned char data[256 * 1024];
    pattern(data, sizeof data, 0);
    int small = 4096;
    setsockopt(f->fd[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    setsockopt(f->fd[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    evbuffer_add(f->buf, data, sizeof data);
    size_t sent = 0;
    ssize_t w;
    while ((w = gw_write_socket(f->fd[0], f->buf)) > 0)
        sent += (size_t)w;
    assert_int_equal(w, -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    assert_true(sent < sizeof data);
    assert_int_equal(evbuffer_get_length(f->buf), sizeof data - sent);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_small_message, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_transfer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eof, setup, teardown),
        cmocka_unit_test_setup_teardown(test_appends_to_what_is_there, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_one_piece_and_many, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_full_socket, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
