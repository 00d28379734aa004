/*
 * sqlroute.h - a SQL route's request and answer: the parameter values it
 * binds, taken from the request, and the HTTP answer made of the statement's
 * result. The pool (pool/pool.h) runs the statement in between.
 *
 * Parameters: `path.X` is the route's :X segment, percent-decoded; `query.X`
 * the query-string parameter X (%XX and '+' decoded; the first when
 * repeated); `header.X` the request header X. A parameter the request lacks
 * takes its `defaults:` value, else the request is refused with 400. Values
 * are always bound as text parameters; one with a NUL byte is refused (400).
 *
 * Answers: result: object -> the first row (404 when none); result: array ->
 * the page's rows, `Content-Range: first-last/ *` and, when more rows follow,
 * `Link: <same path and query, offset advanced>; rel="next"`. A statement
 * without rows (an INSERT without RETURNING) -> 204. SQL errors: the status of
 * pool_sqlstate_status() with the SQLSTATE in the body; 4xx answers carry the
 * server's message (it concerns the client's own values), 5xx never do, and
 * the query text is never in an answer. 503 answers carry Retry-After.
 */
#ifndef GATEWAY_SQLROUTE_H
#define GATEWAY_SQLROUTE_H

#include <stddef.h>
#include <stdint.h>

#include <event2/http.h>

#include "config/config.h"
#include "gateway/router.h"
#include "gateway/runtime.h"
#include "pool/pool.h"

typedef struct sqlroute_params {
    int count;
    char **values;         /* count entries, owned */
    int64_t limit, offset; /* result: array: the page asked for */
    char message[160];     /* why a request was refused, when it names a parameter */
} sqlroute_params;

/* Gather the values to bind for route (plan from its runtime) from req and
 * the router's match. 0, or the status to answer (400, 500) with a message in
 * *why. The caller frees p with sqlroute_params_free() either way. */
int sqlroute_params_build(const config_route_sql *sql, const gw_sql_plan *plan, const router_match *m,
                          struct evhttp_request *req, sqlroute_params *p, const char **why);
void sqlroute_params_free(sqlroute_params *p);

/* Make the answer for result without sending it: returns its status, adds
 * its header fields (Content-Type, Content-Range, Link, Retry-After) to req's
 * output headers and writes its identity body into body (nothing for 204).
 * X-Request-Id, compression and sending are the caller's. */
int sqlroute_build(struct evhttp_request *req, const config_route_sql *sql, const sqlroute_params *p,
                   const pool_result *result, const char *request_id, struct evbuffer *body);

#endif
