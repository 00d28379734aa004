/*
 * result.h - what a SQL route answers, made from a query's PGresult: JSON
 * encoding of rows and PostgREST-style paging. Pure: no I/O, no state; any
 * thread.
 *
 * JSON: a result of exactly one column of type json or jsonb (row_to_json,
 * json_agg, to_jsonb...) is passed through as the server wrote it. Other rows
 * become objects keyed by column name, in column order; values by type OID:
 * SQL NULL -> null; bool -> true/false; int2, int4, int8, oid -> the number as
 * written; float4, float8, numeric -> the number as written when finite, else
 * a string ("NaN", "Infinity", "-Infinity"); json, jsonb -> as is; anything
 * else -> a JSON string. Strings escape '"', '\\' and every byte below 0x20
 * (\n \r \t \b \f by name, the rest as \u00XX); a byte sequence that is not
 * UTF-8 becomes U+FFFD, so the answer is always valid JSON.
 *
 * Paging (result: array): the client's `limit` and `offset` query parameters,
 * non-negative decimal integers; limit defaults to, and is capped at, the
 * route's max_rows. The gateway fetches limit + 1 rows: it answers at most
 * limit, and the extra row says there are more.
 */
#ifndef GATEWAY_POOL_RESULT_H
#define GATEWAY_POOL_RESULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>
#include <libpq-fe.h>

#define POOL_OID_BOOL 16
#define POOL_OID_INT8 20
#define POOL_OID_INT2 21
#define POOL_OID_INT4 23
#define POOL_OID_OID 26
#define POOL_OID_JSON 114
#define POOL_OID_FLOAT4 700
#define POOL_OID_FLOAT8 701
#define POOL_OID_NUMERIC 1700
#define POOL_OID_JSONB 3802

/* Append s[0..len) as a JSON string literal, quotes included. */
void pool_json_string(struct evbuffer *out, const char *s, size_t len);

/* True when res has exactly one column and its type is json or jsonb. */
bool pool_result_single_json(const PGresult *res);

/* Append row `row` of res as one JSON value (see above). */
void pool_json_row(struct evbuffer *out, const PGresult *res, int row);

/* Append rows [0, nrows) of res as a JSON array: "[row,row,...]". */
void pool_json_rows(struct evbuffer *out, const PGresult *res, int nrows);

/* Parse the client's paging parameters (NULL: absent). Returns 0 and sets
 * *limit (default and cap max_rows) and *offset (default 0), or -1 when either
 * is not a non-negative decimal integer (leading '+', spaces, signs and
 * overflow past INT64_MAX included). */
int pool_page_parse(const char *limit, const char *offset, int64_t max_rows, int64_t *out_limit,
                    int64_t *out_offset);

/* The route's query wrapped for paging by the gateway:
 * "SELECT * FROM (<query>\n) AS gw_page LIMIT $<nparams+1> OFFSET $<nparams+2>",
 * with trailing whitespace and semicolons of the query removed (the newline
 * ends a trailing -- comment). malloc'd;
 * NULL when out of memory. */
char *pool_page_wrap(const char *query, int nparams);

/* PostgREST's Content-Range for `rows` rows starting at offset: "0-24/ *"
 * (without the space), or "* / *" (without spaces) when rows is 0. Returns
 * the length written (buf of at least 48 bytes). */
size_t pool_page_content_range(char *buf, size_t size, int64_t offset, int64_t rows);

#endif
