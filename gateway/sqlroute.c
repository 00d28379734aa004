/*
 * sqlroute.c - parameters in, JSON out, for SQL routes (see sqlroute.h).
 */
#include "gateway/sqlroute.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "gateway/httputil.h"
#include "pool/result.h"

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (char)(c | 0x20);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Percent-decode s[0..len) (and '+' as a space when plus) into a new string.
 * NULL when out of memory or when it decodes to a NUL byte (*nul set). */
static char *decode(const char *s, size_t len, bool plus, bool *nul)
{
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%' && i + 2 < len && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
            c = (char)(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
            i += 2;
        } else if (c == '+' && plus) {
            c = ' ';
        }
        if (c == '\0') {
            *nul = true;
            free(out);
            return NULL;
        }
        out[n++] = c;
    }
    out[n] = '\0';
    return out;
}

/* Find query-string parameter name in query (raw, may be NULL); the decoded
 * value of its first occurrence, or NULL (absent). *bad on a NUL. */
static char *query_param(const char *query, const char *name, bool *bad)
{
    size_t name_len = strlen(name);
    for (const char *p = query; p && *p;) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        size_t klen = eq ? (size_t)(eq - p) : len;
        bool nul = false;
        char *key = decode(p, klen, true, &nul);
        bool match = key && strlen(key) == name_len && memcmp(key, name, name_len) == 0;
        free(key);
        if (match) {
            char *v = eq ? decode(eq + 1, len - klen - 1, true, &nul) : strdup("");
            if (!v && nul)
                *bad = true;
            return v;
        }
        p = end ? end + 1 : NULL;
    }
    return NULL;
}

static char *path_param(const router_match *m, const char *name, bool *bad)
{
    for (size_t i = 0; i < m->param_count; i++) {
        if (m->params[i].name_len == strlen(name) &&
            memcmp(m->params[i].name, name, m->params[i].name_len) == 0) {
            bool nul = false;
            char *v = decode(m->params[i].value, m->params[i].value_len, false, &nul);
            if (!v && nul)
                *bad = true;
            return v;
        }
    }
    return NULL;
}

static const char *default_of(const config_route_sql *sql, const char *source)
{
    for (size_t i = 0; i < sql->default_count; i++)
        if (strcmp(sql->defaults[i].key, source) == 0)
            return sql->defaults[i].value;
    return NULL;
}

void sqlroute_params_free(sqlroute_params *p)
{
    for (int i = 0; p->values && i < p->count; i++)
        free(p->values[i]);
    free(p->values);
    p->values = NULL;
    p->count = 0;
}

int sqlroute_params_build(const config_route_sql *sql, const gw_sql_plan *plan, const router_match *m,
                          struct evhttp_request *req, sqlroute_params *p, const char **why)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    struct evkeyvalq *in = evhttp_request_get_input_headers(req);
    memset(p, 0, sizeof *p);
    p->values = calloc((size_t)plan->nparams + 1, sizeof *p->values);
    if (!p->values) {
        *why = "out of memory";
        return 500;
    }
    p->count = plan->nparams;
    bool bad = false;
    for (size_t i = 0; i < sql->param_count; i++) {
        const char *src = sql->params[i];
        char *v = NULL;
        if (strncmp(src, "path.", 5) == 0) {
            v = path_param(m, src + 5, &bad);
        } else if (strncmp(src, "query.", 6) == 0) {
            v = query_param(query, src + 6, &bad);
        } else if (strncmp(src, "header.", 7) == 0) {
            const char *h = evhttp_find_header(in, src + 7);
            v = h ? strdup(h) : NULL;
        }
        if (bad) {
            *why = "a parameter decodes to a NUL byte";
            return 400;
        }
        bool paging = sql->result == CONFIG_RESULT_ARRAY &&
                      ((int)i == plan->limit_param || (int)i == plan->offset_param);
        if (!v) {
            const char *d = default_of(sql, src);
            if (!d && paging)
                continue; /* the page's default, bound below */
            if (!d) {
                snprintf(p->message, sizeof p->message, "missing parameter %s", src);
                *why = p->message;
                return 400;
            }
            v = strdup(d);
        }
        if (!v) {
            *why = "out of memory";
            return 500;
        }
        p->values[i] = v;
    }
    if (sql->result != CONFIG_RESULT_ARRAY)
        return 0;

    /* Paging: the client's limit / offset, or the route's bound query.limit /
     * query.offset values (defaults included). */
    const char *lim = plan->limit_param >= 0 ? p->values[plan->limit_param] : NULL;
    const char *off = plan->offset_param >= 0 ? p->values[plan->offset_param] : NULL;
    char *qlim = plan->limit_param < 0 ? query_param(query, "limit", &bad) : NULL;
    char *qoff = plan->offset_param < 0 ? query_param(query, "offset", &bad) : NULL;
    int rc = pool_page_parse(qlim ? qlim : lim, qoff ? qoff : off, sql->max_rows, &p->limit, &p->offset);
    free(qlim);
    free(qoff);
    if (rc != 0 || bad) {
        *why = "limit and offset must be non-negative integers";
        return 400;
    }
    char num[24];
    if (plan->limit_param >= 0) {
        snprintf(num, sizeof num, "%lld", (long long)p->limit + 1);
        free(p->values[plan->limit_param]);
        p->values[plan->limit_param] = strdup(num);
        if (!p->values[plan->limit_param]) {
            *why = "out of memory";
            return 500;
        }
    }
    if (plan->offset_param >= 0 && !p->values[plan->offset_param]) {
        snprintf(num, sizeof num, "%lld", (long long)p->offset);
        p->values[plan->offset_param] = strdup(num);
        if (!p->values[plan->offset_param]) {
            *why = "out of memory";
            return 500;
        }
    }
    if (plan->wrapped) {
        int n = (int)sql->param_count;
        snprintf(num, sizeof num, "%lld", (long long)p->limit + 1);
        p->values[n] = strdup(num);
        /* A query that binds query.offset itself has applied it already. */
        snprintf(num, sizeof num, "%lld", plan->offset_param >= 0 ? 0LL : (long long)p->offset);
        p->values[n + 1] = strdup(num);
        if (!p->values[n] || !p->values[n + 1]) {
            *why = "out of memory";
            return 500;
        }
    }
    return 0;
}

/* ---- answers ------------------------------------------------------------------------- */

static void json_field(struct evbuffer *b, const char *key, const char *value)
{
    evbuffer_add_printf(b, ",\"%s\":", key);
    pool_json_string(b, value, strlen(value));
}

static int answer_json(struct evhttp_request *req, int status)
{
    if (status != 204)
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    return status;
}

static int answer_error(struct evhttp_request *req, int status, const char *text, const PGresult *res,
                        const char *request_id, struct evbuffer *b)
{
    evbuffer_drain(b, evbuffer_get_length(b));
    evbuffer_add_printf(b, "{\"error\":");
    pool_json_string(b, text, strlen(text));
    evbuffer_add_printf(b, ",\"status\":%d", status);
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (state)
        json_field(b, "sqlstate", state);
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (msg && status >= 400 && status < 500)
        json_field(b, "message", msg);
    json_field(b, "request_id", request_id ? request_id : "");
    evbuffer_add(b, "}\n", 2);
    if (status == 503) {
        char secs[16];
        snprintf(secs, sizeof secs, "%d", POOL_RETRY_AFTER_SECONDS);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", secs);
    }
    return answer_json(req, status);
}

/* Link: rel="next" for the page after this one: the request's own path and
 * query, its limit and offset replaced. */
static void add_next_link(struct evhttp_request *req, const sqlroute_params *p)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    struct evbuffer *b = evbuffer_new();
    if (!b)
        return;
    evbuffer_add_printf(b, "<%s?", path && *path ? path : "/");
    for (const char *q = query; q && *q;) {
        const char *end = strchr(q, '&');
        size_t len = end ? (size_t)(end - q) : strlen(q);
        bool paging =
            (len >= 6 && strncmp(q, "limit=", 6) == 0) || (len == 5 && strncmp(q, "limit", 5) == 0) ||
            (len >= 7 && strncmp(q, "offset=", 7) == 0) || (len == 6 && strncmp(q, "offset", 6) == 0);
        if (!paging && len > 0) {
            evbuffer_add(b, q, len);
            evbuffer_add(b, "&", 1);
        }
        q = end ? end + 1 : NULL;
    }
    evbuffer_add_printf(b, "limit=%lld&offset=%lld>; rel=\"next\"", (long long)p->limit,
                        (long long)(p->offset + p->limit));
    evbuffer_add(b, "", 1);
    const char *link = (const char *)evbuffer_pullup(b, -1);
    if (link)
        evhttp_add_header(evhttp_request_get_output_headers(req), "Link", link);
    evbuffer_free(b);
}

int sqlroute_build(struct evhttp_request *req, const config_route_sql *sql, const sqlroute_params *p,
                   const pool_result *result, const char *request_id, struct evbuffer *body)
{
    if (result->status != 200) {
        const char *text = result->error ? result->error : "query failed";
        if (result->res) {
            switch (result->status) {
            case 400:
                text = "the database rejected a parameter";
                break;
            case 409:
                text = "conflict";
                break;
            case 503:
                text = "database unavailable";
                break;
            case 504:
                text = "query timed out";
                break;
            default:
                text = "query failed";
            }
        }
        return answer_error(req, result->status, text, result->res, request_id, body);
    }
    const PGresult *res = result->res;
    if (PQresultStatus(res) == PGRES_COMMAND_OK)
        return answer_json(req, 204);
    int rows = PQntuples(res);
    if (sql->result == CONFIG_RESULT_OBJECT) {
        if (rows == 0)
            return answer_error(req, 404, "not found", NULL, request_id, body);
        pool_json_row(body, res, 0);
        evbuffer_add(body, "\n", 1);
    } else {
        int64_t shown = rows > p->limit ? p->limit : rows;
        pool_json_rows(body, res, (int)shown);
        evbuffer_add(body, "\n", 1);
        char range[64];
        pool_page_content_range(range, sizeof range, p->offset, shown);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Range", range);
        if (rows > p->limit && p->limit > 0) /* limit=0 would point at itself */
            add_next_link(req, p);
    }
    return answer_json(req, 200);
}
