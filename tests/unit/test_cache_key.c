/*
 * test_cache_key.c - cache keys, invalidation patterns and the glob of
 * cache/key.h: every template part, the default key, query normalisation,
 * credential hashing, overflow, pattern escaping, and Redis's glob (fixed
 * cases, a differential run against a plain recursive matcher, and
 * patterns that would take exponential time in a naive one).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cmocka.h>

#include "cache/key.h"

/* ---- a fake request ------------------------------------------------------------------ */

typedef struct fake_request {
    const char *params[8][2];  /* :name -> value */
    const char *headers[8][2]; /* name (any case) -> value */
    char asked[8][64];         /* header names as the callback got them */
    int nasked;
} fake_request;

static const char *fake_path_param(void *arg, const char *name, size_t name_len, size_t *value_len)
{
    fake_request *r = arg;
    for (int i = 0; i < 8 && r->params[i][0]; i++) {
        if (strlen(r->params[i][0]) == name_len && memcmp(r->params[i][0], name, name_len) == 0) {
            *value_len = strlen(r->params[i][1]);
            return r->params[i][1];
        }
    }
    return NULL;
}

static const char *fake_header(void *arg, const char *name)
{
    fake_request *r = arg;
    if (r->nasked < 8)
        snprintf(r->asked[r->nasked++], sizeof r->asked[0], "%s", name);
    for (int i = 0; i < 8 && r->headers[i][0]; i++) {
        if (strcasecmp(r->headers[i][0], name) == 0)
            return r->headers[i][1];
    }
    return NULL;
}

static cache_key_source source(const char *method, const char *path, const char *query, fake_request *r)
{
    cache_key_source s = {.method = method,
                          .path = path,
                          .query = query,
                          .path_param = fake_path_param,
                          .header = fake_header,
                          .arg = r};
    return s;
}

/* The key for (tmpl, method, path, query) with no params or headers. */
static const char *key_of(const char *prefix, const char *tmpl, const char *method, const char *path,
                          const char *query)
{
    static char out[1024];
    fake_request r = {0};
    cache_key_source s = source(method, path, query, &r);
    size_t n = cache_key_build(prefix, tmpl, &s, out, sizeof out);
    assert_int_equal(n, strlen(out));
    return out;
}

static const char *norm(const char *query)
{
    return key_of("", "{query}", "GET", "/", query);
}

/* ---- default key --------------------------------------------------------------------- */

static void test_default_key(void **state)
{
    (void)state;
    assert_string_equal(key_of("cache:", NULL, "GET", "/api/blueprints", "a=1"),
                        "cache:GET:/api/blueprints?a=1");
    assert_string_equal(key_of("cache:", NULL, "GET", "/api/blueprints", NULL), "cache:GET:/api/blueprints");
    assert_string_equal(key_of("cache:", NULL, "GET", "/api/blueprints", ""), "cache:GET:/api/blueprints");
    /* Only empty pairs: the normalised query is empty, so no '?'. */
    assert_string_equal(key_of("cache:", NULL, "GET", "/api/blueprints", "&&"), "cache:GET:/api/blueprints");
    assert_string_equal(key_of("cache:", NULL, "GET", "/api/b", "b=2&a=1"), "cache:GET:/api/b?a=1&b=2");
    assert_string_equal(key_of("cache:", NULL, "POST", "/x", NULL), "cache:POST:/x");
    assert_string_equal(key_of(NULL, NULL, "GET", "/x", NULL), "GET:/x");
    /* The path stays as received, percent-encoding and all. */
    assert_string_equal(key_of("c:", NULL, "GET", "/a%20b/%7E", NULL), "c:GET:/a%20b/%7E");
}

static void test_head_is_get(void **state)
{
    (void)state;
    assert_string_equal(key_of("cache:", NULL, "HEAD", "/x", "q=1"), "cache:GET:/x?q=1");
    assert_string_equal(key_of("", "{method}", "HEAD", "/x", NULL), "GET");
    assert_string_equal(key_of("", "{method}", "PUT", "/x", NULL), "PUT");
    /* Only HEAD exactly: methods are case-sensitive. */
    assert_string_equal(key_of("", "{method}", "head", "/x", NULL), "head");
}

/* ---- the query ------------------------------------------------------------------------- */

static void test_query_order(void **state)
{
    (void)state;
    assert_string_equal(norm("b=2&a=1"), "a=1&b=2");
    assert_string_equal(norm("a=1&b=2"), "a=1&b=2");
    assert_string_equal(norm("a=%31&b=2"), "a=1&b=2");
    /* By name; one name's pairs keep their order (?sort=x&sort=y may differ
     * from ?sort=y&sort=x upstream); duplicates kept. */
    assert_string_equal(norm("a=2&b=0&a=1"), "a=2&a=1&b=0");
    assert_string_equal(norm("a=1&b=0&a=2"), "a=1&a=2&b=0");
    assert_string_equal(norm("a=1&a=1"), "a=1&a=1");
    assert_string_equal(norm("a=1&a"), "a=1&a=");
    /* Bytewise: upper case before lower case. */
    assert_string_equal(norm("b=1&B=1"), "B=1&b=1");
    /* On the decoded bytes: '-' (0x2d) before '/' (0x2f), though "%2F" < "-". */
    assert_string_equal(norm("%2F=1&-=1"), "-=1&%2F=1");
    /* A name that is a prefix of another sorts first. */
    assert_string_equal(norm("ab=1&a=2"), "a=2&ab=1");
}

static void test_query_encoding(void **state)
{
    (void)state;
    /* Unreserved bytes decoded and left bare; everything else %XX upper case. */
    assert_string_equal(norm("x=%7e%2d%2E%5f%41%7a%30"), "x=~-._Az0");
    assert_string_equal(norm("x=~-._Az0"), "x=~-._Az0");
    assert_string_equal(norm("x=/"), "x=%2F");
    assert_string_equal(norm("x=%2f"), "x=%2F");
    assert_string_equal(norm("x=%c3%a9"), "x=%C3%A9");
    assert_string_equal(norm("x=\xc3\xa9"), "x=%C3%A9");
    assert_string_equal(norm("x=a:b@c!$'()*,;"), "x=a%3Ab%40c%21%24%27%28%29%2A%2C%3B");
    /* '+' stays '+' (a space to some upstreams, a plus to others): it shares
     * a key with neither %20 nor %2B. */
    assert_string_equal(norm("q=a+b"), "q=a+b");
    assert_string_equal(norm("q=a%20b"), "q=a%20b");
    assert_string_equal(norm("q=a%2Bb"), "q=a%2Bb");
    /* '=' inside a value, encoded '=' and '&' inside a name. */
    assert_string_equal(norm("a=b=c"), "a=b%3Dc");
    assert_string_equal(norm("a%3Db=1"), "a%3Db=1");
    assert_string_equal(norm("a%26b=1"), "a%26b=1");
    /* Missing '=' is "name=", empty pairs dropped, empty name kept. */
    assert_string_equal(norm("a"), "a=");
    assert_string_equal(norm("a="), "a=");
    assert_string_equal(norm("&&a=1&&&b&"), "a=1&b=");
    assert_string_equal(norm("=1"), "=1");
    assert_string_equal(norm(""), "");
    assert_string_equal(norm(NULL), "");
}

static void test_query_malformed_percent(void **state)
{
    (void)state;
    /* Not two hex digits: the '%' is a literal byte, itself encoded. */
    assert_string_equal(norm("x=%zz"), "x=%25zz");
    assert_string_equal(norm("x=%4"), "x=%254");
    assert_string_equal(norm("x=%"), "x=%25");
    assert_string_equal(norm("x=%%41"), "x=%25A");
    assert_string_equal(norm("x=%4g"), "x=%254g");
    assert_string_equal(norm("%=1"), "%25=1");
    /* The literal and the encoded '%' share a key. */
    assert_string_equal(norm("x=%25zz"), "x=%25zz");
    /* An escape is not cut by the pair's end. */
    assert_string_equal(norm("x=%4&y=1"), "x=%254&y=1");
}

static void test_query_params(void **state)
{
    (void)state;
    assert_string_equal(key_of("", "projects:{query.limit}:{query.offset}", "GET", "/p", "offset=10&limit=5"),
                        "projects:5:10");
    assert_string_equal(key_of("", "projects:{query.limit}:{query.offset}", "GET", "/p", "offset=10"),
                        "projects::10");
    assert_string_equal(key_of("", "p:{query.limit}", "GET", "/p", NULL), "p:");
    /* The first one, its value normalised; the name compared decoded. */
    assert_string_equal(key_of("", "{query.a}", "GET", "/p", "a=1&a=2"), "1");
    assert_string_equal(key_of("", "{query.q}", "GET", "/p", "q=a+b%2f"), "a+b%2F");
    assert_string_equal(key_of("", "{query.limit}", "GET", "/p", "%6Cimit=7"), "7");
    assert_string_equal(key_of("", "{query.a}", "GET", "/p", "a&a=2"), "");
    assert_string_equal(key_of("", "{query.a}", "GET", "/p", "ab=1&b=a"), "");
    assert_string_equal(key_of("", "{query}|{query.b}", "GET", "/p", "b=2&a=1"), "a=1&b=2|2");
}

/* ---- template parts -------------------------------------------------------------------- */

static void test_template_parts(void **state)
{
    (void)state;
    char out[512];
    fake_request r = {.params = {{"id", "42"}, {"org", "acme"}}, .headers = {{"X-Tenant", "t1"}}};
    cache_key_source s = source("GET", "/api/orgs/acme/projects/42", "z=1&y=2", &r);
    size_t n = cache_key_build(
        "cache:", "{method} {path} {path.org}/{path.id} {query} {query.y} {header.x-tenant} {path.none}|", &s,
        out, sizeof out);
    assert_string_equal(out, "cache:GET /api/orgs/acme/projects/42 acme/42 y=2&z=1 2 t1 |");
    assert_int_equal(n, strlen(out));
    /* The header callback got the name as the template wrote it. */
    assert_int_equal(r.nasked, 1);
    assert_string_equal(r.asked[0], "x-tenant");

    /* Parts the request lacks expand to nothing. */
    fake_request none = {0};
    s = source("GET", "/x", NULL, &none);
    n = cache_key_build("k:", "{path.id}{query}{query.a}{header.X-Nope}.", &s, out, sizeof out);
    assert_string_equal(out, "k:.");
    /* No callbacks at all. */
    cache_key_source bare = {.method = "GET", .path = "/x"};
    n = cache_key_build("k:", "{path.id}:{header.A}:{path}", &bare, out, sizeof out);
    assert_string_equal(out, "k:::/x");
    assert_int_equal(n, 6);
}

static void test_template_other_text(void **state)
{
    (void)state;
    /* Anything that is not one of the parts is copied. */
    assert_string_equal(key_of("", "{unknown}:{Method}:{path.}:{query.}:{header.}", "GET", "/x", NULL),
                        "{unknown}:{Method}:{path.}:{query.}:{header.}");
    assert_string_equal(key_of("", "{{method}}", "GET", "/x", NULL), "{GET}");
    assert_string_equal(key_of("", "a{b", "GET", "/x", NULL), "a{b");
    assert_string_equal(key_of("", "}{", "GET", "/x", NULL), "}{");
    assert_string_equal(key_of("", "{method", "GET", "/x", NULL), "{method");
    assert_string_equal(key_of("p:", "plain*text?", "GET", "/x", NULL), "p:plain*text?");
    /* A template naming nothing is one key for every request. */
    assert_string_equal(key_of("p:", "", "GET", "/x", NULL), "p:");
}

/* ---- credentials ------------------------------------------------------------------------- */

static void test_credential_headers_hashed(void **state)
{
    (void)state;
    char out[256];
    /* SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223 b00361a3... */
    fake_request r = {
        .headers = {
            {"Authorization", "abc"}, {"Proxy-Authorization", "abc"}, {"Cookie", "abc"}, {"X-Plain", "abc"}}};
    cache_key_source s = source("GET", "/x", NULL, &r);
    cache_key_build("", "{header.Authorization}", &s, out, sizeof out);
    assert_string_equal(out, "h:ba7816bf8f01cfea414140de5dae2223");
    cache_key_build("",
                    "{header.authorization}|{header.PROXY-AUTHORIZATION}|{header.cookie}|{header.x-plain}",
                    &s, out, sizeof out);
    assert_string_equal(out, "h:ba7816bf8f01cfea414140de5dae2223|h:ba7816bf8f01cfea414140de5dae2223|"
                             "h:ba7816bf8f01cfea414140de5dae2223|abc");

    /* A real token never shows in the key; different tokens, different keys. */
    char other[256];
    fake_request a = {.headers = {{"Authorization", "Bearer secret-token-1"}}};
    fake_request b = {.headers = {{"Authorization", "Bearer secret-token-2"}}};
    s = source("GET", "/x", NULL, &a);
    size_t n = cache_key_build("c:", "{header.Authorization}", &s, out, sizeof out);
    assert_int_equal(n, 2 + 2 + 32);
    assert_null(strstr(out, "secret"));
    s = source("GET", "/x", NULL, &b);
    cache_key_build("c:", "{header.Authorization}", &s, other, sizeof other);
    assert_string_not_equal(out, other);
    /* Absent: nothing, not the hash of "". */
    fake_request none = {0};
    s = source("GET", "/x", NULL, &none);
    cache_key_build("c:", "[{header.Authorization}]", &s, out, sizeof out);
    assert_string_equal(out, "c:[]");
}

static void test_names_authorization(void **state)
{
    (void)state;
    assert_false(cache_key_names_authorization(NULL));
    assert_false(cache_key_names_authorization(""));
    assert_true(cache_key_names_authorization("{header.Authorization}"));
    assert_true(cache_key_names_authorization("u:{path}:{header.AUTHORIZATION}"));
    assert_true(cache_key_names_authorization("{header.authorization}"));
    assert_false(cache_key_names_authorization("{header.Authorizations}"));
    assert_false(cache_key_names_authorization("{header.Proxy-Authorization}"));
    assert_false(cache_key_names_authorization("Authorization:{path}"));
    assert_false(cache_key_names_authorization("{query.Authorization}"));
}

/* ---- overflow ---------------------------------------------------------------------------- */

static void test_overflow_returns_zero(void **state)
{
    (void)state;
    fake_request r = {.params = {{"id", "12345"}}, .headers = {{"Authorization", "x"}}};
    const char *tmpls[] = {NULL, "{method}:{path}:{path.id}:{query}:{header.Authorization}"};
    for (size_t t = 0; t < 2; t++) {
        cache_key_source s = source("GET", "/api/x", "b=%2f&a=1", &r);
        char full[256];
        size_t len = cache_key_build("cache:", tmpls[t], &s, full, sizeof full);
        assert_true(len > 10);
        for (size_t size = 0; size <= len + 1; size++) {
            char out[256];
            memset(out, 'Z', sizeof out);
            size_t n = cache_key_build("cache:", tmpls[t], &s, out, size);
            if (size <= len) {
                assert_int_equal(n, 0);
                assert_true(size == 0 || out[0] == '\0');
                assert_true(out[size] == 'Z'); /* nothing past the buffer */
            } else {
                assert_int_equal(n, len);
                assert_string_equal(out, full);
            }
        }
    }
    /* NULL output buffer. */
    cache_key_source s = source("GET", "/x", NULL, &r);
    assert_int_equal(cache_key_build("c:", NULL, &s, NULL, 0), 0);
}

static void test_overflow_limits(void **state)
{
    (void)state;
    char out[8192];
    fake_request r = {0};
    /* 256 pairs sort; 257 do not (the request bypasses). */
    char q[4096] = "";
    for (int i = 0; i < 256; i++)
        strcat(q, i ? "&a" : "a");
    cache_key_source s = source("GET", "/x", q, &r);
    assert_true(cache_key_build("c:", NULL, &s, out, sizeof out) > 0);
    strcat(q, "&a");
    s = source("GET", "/x", q, &r);
    assert_int_equal(cache_key_build("c:", NULL, &s, out, sizeof out), 0);
    assert_int_equal(cache_key_build("c:", "{query}", &s, out, sizeof out), 0);
    /* ... though {query.X} does not sort. */
    assert_int_equal(cache_key_build("c:", "{query.a}", &s, out, sizeof out), 2);

    /* A header name of 256 bytes cannot be asked for. */
    char tmpl[400] = "{header.";
    memset(tmpl + 8, 'n', 255);
    strcpy(tmpl + 8 + 255, "}");
    s = source("GET", "/x", NULL, &r);
    assert_int_equal(cache_key_build("c:", tmpl, &s, out, sizeof out), 2);
    memset(tmpl + 8, 'n', 256);
    strcpy(tmpl + 8 + 256, "}");
    assert_int_equal(cache_key_build("c:", tmpl, &s, out, sizeof out), 0);
}

/* ---- patterns ---------------------------------------------------------------------------- */

static void test_pattern_build(void **state)
{
    (void)state;
    char pat[256], key[256];
    fake_request r = {.params = {{"id", "a*b?[c]\\d"}}, .headers = {{"X-T", "*"}}};
    cache_key_source s = source("PUT", "/api/projects/a*b", "q=*", &r);
    size_t n = cache_pattern_build("cache:GET:/api/projects/{path.id}*", &s, pat, sizeof pat);
    /* {path.X} values are %-encoded in keys, so no glob character is left in them. */
    assert_string_equal(pat, "cache:GET:/api/projects/a%2Ab%3F%5Bc%5D%5Cd*");
    assert_int_equal(n, strlen(pat));
    /* No prefix added; the template's own glob characters kept. */
    cache_pattern_build("{method}:{path}?[ab]:{header.X-T}:{query}", &s, pat, sizeof pat);
    assert_string_equal(pat, "PUT:/api/projects/a\\*b?[ab]:%2A:q=%2A");

    /* The pattern matches the key of the same request and no other. */
    cache_pattern_build("p:{path.id}", &s, pat, sizeof pat);
    size_t kn = cache_key_build("p:", "{path.id}", &s, key, sizeof key);
    assert_true(cache_glob_match(pat, strlen(pat), key, kn));
    assert_false(cache_glob_match(pat, strlen(pat), "p:aXb?[c]\\d", 11));
    assert_false(cache_glob_match(pat, strlen(pat), "p:a*b?c\\d", 9));
    assert_false(cache_glob_match(pat, strlen(pat), "p:a*bX[c]\\d", 11));

    /* Overflow: 0, also when only the escapes make it too long ({path} is
     * written as received, so its glob characters are escaped). */
    n = cache_pattern_build("{path.id}", &s, pat, sizeof pat);
    assert_int_equal(n, 19);
    assert_int_equal(cache_pattern_build("{path.id}", &s, pat, 20), 19);
    assert_int_equal(cache_pattern_build("{path.id}", &s, pat, 19), 0);
    n = cache_pattern_build("{path}", &s, pat, sizeof pat);
    assert_int_equal(n, 18); /* "/api/projects/a\\*b" */
    assert_int_equal(cache_pattern_build("{path}", &s, pat, 19), 18);
    assert_int_equal(cache_pattern_build("{path}", &s, pat, 18), 0);
    assert_int_equal(cache_pattern_build(NULL, &s, pat, sizeof pat), 0);
}

/* Values cannot shift text between the template's parts: with
 * "t:{path.id}:{query.x}:{header.X-Tenant}", /t/5:1 for tenant t1 and /t/5?x=1
 * for tenant ":t1" would both read "t:5:1::t1" if values were copied raw. */
static void test_values_cannot_forge_keys(void **state)
{
    (void)state;
    char a[256], b[256];
    const char *tmpl = "t:{path.id}:{query.x}:{header.X-Tenant}";
    fake_request ra = {.params = {{"id", "5:1"}}, .headers = {{"X-Tenant", "t1"}}};
    fake_request rb = {.params = {{"id", "5"}}, .headers = {{"X-Tenant", ":t1"}}};
    cache_key_source sa = source("GET", "/t/5:1", NULL, &ra), sb = source("GET", "/t/5", "x=1", &rb);
    cache_key_build("c:", tmpl, &sa, a, sizeof a);
    cache_key_build("c:", tmpl, &sb, b, sizeof b);
    assert_string_equal(a, "c:t:5%3A1::t1");
    assert_string_equal(b, "c:t:5:1:%3At1");
    assert_string_not_equal(a, b);
    /* A path segment's %3A and ':' are one value; a header's "%3A" is not ':'. */
    fake_request rc = {.params = {{"id", "5%3a1"}}, .headers = {{"X-Tenant", "%3At1"}}};
    cache_key_source sc = source("GET", "/t/5%3a1", NULL, &rc);
    cache_key_build("c:", tmpl, &sc, b, sizeof b);
    assert_string_equal(b, "c:t:5%3A1::%253At1");
}

/* ---- glob -------------------------------------------------------------------------------- */

static bool gm(const char *p, const char *s)
{
    return cache_glob_match(p, strlen(p), s, strlen(s));
}

static void test_glob_basics(void **state)
{
    (void)state;
    assert_true(gm("cache:GET:/api/blueprints*", "cache:GET:/api/blueprints?a=1"));
    assert_true(gm("cache:GET:/api/blueprints*", "cache:GET:/api/blueprints"));
    assert_false(gm("cache:GET:/api/blueprints*", "cache:GET:/api/blueprint"));
    assert_false(gm("cache:GET:/api/blueprints*", "xcache:GET:/api/blueprints"));
    assert_true(gm("*", "abc"));
    assert_true(gm("**", "abc"));
    assert_true(gm("", ""));
    assert_false(gm("", "a"));
    assert_false(gm("a", ""));
    /* Redis: an empty string matches only the empty pattern. */
    assert_false(gm("*", ""));
    assert_false(gm("**", ""));
    assert_true(gm("a*", "a"));
    assert_true(gm("a**", "a"));
    assert_true(gm("*a", "a"));
    assert_true(gm("a*b*c", "abc"));
    assert_true(gm("a*b*c", "axxbyyc"));
    assert_false(gm("a*b*c", "axxbyy"));
    assert_true(gm("a?c", "abc"));
    assert_false(gm("a?c", "ac"));
    assert_false(gm("a?c", "abbc"));
    assert_true(gm("*?", "a"));
    assert_false(gm("?*", ""));
    assert_true(gm("*x*", "x"));
    assert_true(gm("abc", "abc"));
    assert_false(gm("abc", "abd"));
    assert_false(gm("abc", "ABC"));
    /* Binary-safe: lengths, not NULs. */
    assert_true(cache_glob_match("a*\0b", 4, "axy\0b", 5));
    assert_false(cache_glob_match("a*\0b", 4, "axyb", 4));
}

static void test_glob_escapes(void **state)
{
    (void)state;
    assert_true(gm("\\*", "*"));
    assert_false(gm("\\*", "a"));
    assert_true(gm("a\\?", "a?"));
    assert_false(gm("a\\?", "ab"));
    assert_true(gm("\\[a]", "[a]"));
    assert_false(gm("\\[a]", "a"));
    assert_true(gm("\\\\", "\\"));
    assert_true(gm("\\a", "a"));
    /* A lone backslash at the end is itself. */
    assert_true(gm("a\\", "a\\"));
    assert_false(gm("a\\", "a"));
    /* After the string ends only unescaped stars may remain. */
    assert_false(gm("a\\*", "a"));
    assert_true(gm("*\\*", "abc*"));
    assert_false(gm("*\\*", "abc"));
    assert_true(gm("]", "]"));
}

static void test_glob_classes(void **state)
{
    (void)state;
    assert_true(gm("[abc]", "b"));
    assert_false(gm("[abc]", "d"));
    assert_false(gm("[abc]", ""));
    assert_true(gm("[^abc]", "d"));
    assert_false(gm("[^abc]", "a"));
    assert_true(gm("[a-c]x", "bx"));
    assert_false(gm("[a-c]x", "dx"));
    assert_true(gm("[c-a]", "b")); /* reversed range */
    assert_true(gm("[0-9a-f]", "e"));
    assert_false(gm("[0-9a-f]", "g"));
    assert_true(gm("[^0-9]", "x"));
    assert_false(gm("[^0-9]", "5"));
    /* Escapes inside a class. */
    assert_true(gm("[\\]]", "]"));
    assert_true(gm("[\\^a]", "^"));
    assert_true(gm("[a\\-z]", "-"));
    assert_false(gm("[a\\-z]", "b"));
    assert_true(gm("[\\\\]", "\\"));
    /* '^' not first is a member; ']' first closes an empty class. */
    assert_true(gm("[a^]", "^"));
    assert_false(gm("[]a]", "a"));
    assert_false(gm("[]a]", "xa]"));
    /* Redis reads "a-]" as the range a..']', and the class runs on. */
    assert_true(gm("[a-]", "_"));
    assert_false(gm("[a-]", "b"));
    assert_true(gm("[a-]x", "_"));
    /* A class the pattern ends inside takes the rest. */
    assert_true(gm("[abc", "b"));
    assert_false(gm("[abc", "d"));
    assert_true(gm("[^", "x"));
    assert_false(gm("[", "x"));
    assert_false(gm("[", ""));
    /* A class is one byte. */
    assert_true(gm("x[ab]y*", "xay"));
    assert_false(gm("x[ab]y", "xaby"));
    /* Ranges compare bytes unsigned. */
    assert_true(gm("[a-\xff]", "\xe9"));
    assert_false(gm("[a-\xff]", "A"));
    assert_true(gm("[^\x01-\x7f]", "\x80"));
}

static void test_glob_is_literal(void **state)
{
    (void)state;
    assert_true(cache_glob_is_literal("", 0));
    assert_true(cache_glob_is_literal("cache:GET:/x?a=1", 10));
    assert_false(cache_glob_is_literal("cache:GET:/x?a=1", 16));
    assert_false(cache_glob_is_literal("a*", 2));
    assert_false(cache_glob_is_literal("a[b]", 4));
    assert_true(cache_glob_is_literal("a]", 2));
    assert_true(cache_glob_is_literal("a\\*", 3));
    assert_true(cache_glob_is_literal("a\\?\\[", 5));
    assert_false(cache_glob_is_literal("a\\\\*", 4));
    assert_true(cache_glob_is_literal("a\\", 2));
    assert_true(cache_glob_is_literal("^-", 2));
}

/* A plain recursive matcher of the same grammar, written independently of
 * key.c (index arithmetic, no backtracking state), for small inputs. */
static size_t ref_token_end(const char *p, size_t pn, size_t i, unsigned char c, bool *match)
{
    unsigned char t = (unsigned char)p[i];
    if (t == '?') {
        *match = true;
        return i + 1;
    }
    if (t == '\\') {
        if (i + 1 == pn) {
            *match = c == '\\';
            return i + 1;
        }
        *match = (unsigned char)p[i + 1] == c;
        return i + 2;
    }
    if (t != '[') {
        *match = t == c;
        return i + 1;
    }
    size_t j = i + 1;
    bool neg = j < pn && p[j] == '^', in = false;
    if (neg)
        j++;
    while (j < pn && p[j] != ']') {
        unsigned char a = (unsigned char)p[j];
        if (a == '\\' && j + 1 < pn) {
            in |= (unsigned char)p[j + 1] == c;
            j += 2;
        } else if (j + 2 < pn && p[j + 1] == '-') {
            unsigned char b = (unsigned char)p[j + 2];
            in |= (a <= b) ? (c >= a && c <= b) : (c >= b && c <= a);
            j += 3;
        } else {
            in |= a == c;
            j++;
        }
    }
    *match = neg ? !in : in;
    return j < pn ? j + 1 : pn; /* past ']', or the pattern's end */
}

static bool ref_rec(const char *p, size_t pn, size_t i, const char *s, size_t sn, size_t k)
{
    if (i == pn)
        return k == sn;
    if (p[i] == '*')
        return ref_rec(p, pn, i + 1, s, sn, k) || (k < sn && ref_rec(p, pn, i, s, sn, k + 1));
    if (k == sn)
        return false;
    bool m;
    size_t next = ref_token_end(p, pn, i, (unsigned char)s[k], &m);
    return m && ref_rec(p, pn, next, s, sn, k + 1);
}

static bool ref_match(const char *p, size_t pn, const char *s, size_t sn)
{
    return sn == 0 ? pn == 0 : ref_rec(p, pn, 0, s, sn, 0);
}

static void test_glob_differential(void **state)
{
    (void)state;
    static const char palpha[] = "ab*?[]^-\\";
    static const char salpha[] = "ab]^-\\*";
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    char p[10], s[10];
    int matches = 0;
    for (int iter = 0; iter < 300000; iter++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t pn = x % 9, sn = (x >> 8) % 8;
        for (size_t i = 0; i < pn; i++)
            p[i] = palpha[(x >> (16 + 3 * i)) % (sizeof palpha - 1)];
        uint64_t y = x * 0x2545F4914F6CDD1DULL;
        for (size_t i = 0; i < sn; i++)
            s[i] = salpha[(y >> (4 * i)) % (sizeof salpha - 1)];
        bool want = ref_match(p, pn, s, sn), got = cache_glob_match(p, pn, s, sn);
        if (want != got)
            fail_msg("pattern \"%.*s\" string \"%.*s\": want %d got %d", (int)pn, p, (int)sn, s, want, got);
        matches += got;
    }
    assert_true(matches > 1000); /* the run is not all misses */
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_glob_hostile(void **state)
{
    (void)state;
    size_t n = 100000;
    char *s = malloc(n + 1);
    assert_non_null(s);
    memset(s, 'a', n);
    s[n] = '\0';
    const char *p = "*a*a*a*a*a*a*b";
    double t0 = now_s();
    assert_false(cache_glob_match(p, strlen(p), s, n));
    s[n - 1] = 'b';
    assert_true(cache_glob_match(p, strlen(p), s, n));
    /* 4000 stars: no recursion to run out of stack. */
    size_t pn = 8000;
    char *many = malloc(pn);
    assert_non_null(many);
    for (size_t i = 0; i < pn; i += 2) {
        many[i] = '*';
        many[i + 1] = 'a';
    }
    s[n - 1] = 'a';
    assert_true(cache_glob_match(many, pn, s, 5000));
    assert_false(cache_glob_match(many, pn, s, 3999));
    many[pn - 1] = 'b';
    assert_false(cache_glob_match(many, pn, s, 20000));
    double took = now_s() - t0;
    /* Milliseconds here; a backtracking recursion would not finish at all. */
    if (took > 5.0)
        fail_msg("hostile patterns took %.2f s", took);
    free(many);
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_key),
        cmocka_unit_test(test_head_is_get),
        cmocka_unit_test(test_query_order),
        cmocka_unit_test(test_query_encoding),
        cmocka_unit_test(test_query_malformed_percent),
        cmocka_unit_test(test_query_params),
        cmocka_unit_test(test_template_parts),
        cmocka_unit_test(test_template_other_text),
        cmocka_unit_test(test_credential_headers_hashed),
        cmocka_unit_test(test_names_authorization),
        cmocka_unit_test(test_overflow_returns_zero),
        cmocka_unit_test(test_overflow_limits),
        cmocka_unit_test(test_pattern_build),
        cmocka_unit_test(test_values_cannot_forge_keys),
        cmocka_unit_test(test_glob_basics),
        cmocka_unit_test(test_glob_escapes),
        cmocka_unit_test(test_glob_classes),
        cmocka_unit_test(test_glob_is_literal),
        cmocka_unit_test(test_glob_differential),
        cmocka_unit_test(test_glob_hostile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
