/*
 * test_router.c - route matching rules (gateway/router.c): exact, :param and
 * prefix specificity, file order on ties, methods, 404/405 and Allow.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/router.h"

static config_route route(const char *name, const char *path, const char *prefix, unsigned methods)
{
    config_route r;
    memset(&r, 0, sizeof r);
    r.name = (char *)name;
    r.path = (char *)path;
    r.prefix = (char *)prefix;
    r.methods = methods;
    return r;
}

static int match(const router_t *r, const char *path, unsigned method, router_match *m)
{
    router_match_path(r, path, method, m);
    return m->status == 0 ? m->route_index : -m->status;
}

static void test_specificity(void **state)
{
    config_route routes[] = {
        route("api", NULL, "/api/", CONFIG_METHOD_ALL),
        route("api-projects", NULL, "/api/projects", CONFIG_METHOD_ALL),
        route("project", "/api/projects/:id", NULL, CONFIG_METHOD_GET),
        route("project-new", "/api/projects/new", NULL, CONFIG_METHOD_GET),
        route("root", NULL, "/", CONFIG_METHOD_ALL),
    };
    router_t *r = router_create(routes, 5);
    router_match m;
    assert_non_null(r);
    assert_int_equal(match(r, "/api/projects/new", CONFIG_METHOD_GET, &m), 3); /* exact beats param */
    assert_int_equal(match(r, "/api/projects/42", CONFIG_METHOD_GET, &m), 2);  /* param beats prefix */
    assert_int_equal(m.param_count, 1);
    assert_int_equal(m.params[0].name_len, 2);
    assert_memory_equal(m.params[0].name, "id", 2);
    assert_int_equal(m.params[0].value_len, 2);
    assert_memory_equal(m.params[0].value, "42", 2);
    assert_int_equal(match(r, "/api/projects/42", CONFIG_METHOD_POST, &m),
                     1); /* longest prefix accepting POST */
    assert_int_equal(match(r, "/api/other", CONFIG_METHOD_GET, &m), 0);
    assert_int_equal(match(r, "/elsewhere", CONFIG_METHOD_DELETE, &m), 4);
    assert_int_equal(match(r, "/api/projects/42/x", CONFIG_METHOD_GET, &m), 1); /* param needs exact depth */
    assert_int_equal(match(r, "/api/projects/", CONFIG_METHOD_GET, &m), 1); /* empty param never matches */
    router_free(r);
}

static void test_ties_in_file_order(void **state)
{
    config_route routes[] = {
        route("first", "/a/:x", NULL, CONFIG_METHOD_ALL),
        route("second", "/a/:y", NULL, CONFIG_METHOD_ALL),
        route("p1", NULL, "/b", CONFIG_METHOD_ALL),
        route("p2", NULL, "/b", CONFIG_METHOD_ALL),
    };
    router_t *r = router_create(routes, 4);
    router_match m;
    assert_int_equal(match(r, "/a/1", CONFIG_METHOD_GET, &m), 0);
    assert_int_equal(match(r, "/b/c", CONFIG_METHOD_GET, &m), 2);
    router_free(r);
}

static void test_404_405_allow(void **state)
{
    config_route routes[] = {
        route("list", "/items", NULL, CONFIG_METHOD_GET),
        route("write", "/items", NULL, CONFIG_METHOD_POST | CONFIG_METHOD_PUT),
    };
    router_t *r = router_create(routes, 2);
    router_match m;
    char allow[96];
    assert_int_equal(match(r, "/items", CONFIG_METHOD_HEAD, &m), 0); /* GET implies HEAD */
    assert_int_equal(match(r, "/items", CONFIG_METHOD_PUT, &m), 1);
    assert_int_equal(match(r, "/items", CONFIG_METHOD_DELETE, &m), -405);
    router_allow_header(m.allow, allow, sizeof allow);
    assert_string_equal(allow, "GET, HEAD, POST, PUT");
    assert_int_equal(match(r, "/items/1", CONFIG_METHOD_GET, &m), -404);
    assert_int_equal(m.allow, 0);
    assert_int_equal(match(r, "/item", CONFIG_METHOD_GET, &m), -404);
    router_free(r);
}

static void test_methods_default_all(void **state)
{
    config_route routes[] = {route("any", "/x", NULL, 0)};
    router_t *r = router_create(routes, 1);
    router_match m;
    assert_int_equal(match(r, "/x", CONFIG_METHOD_PATCH, &m), 0);
    assert_int_equal(match(r, "/x", CONFIG_METHOD_OPTIONS, &m), 0);
    /* never TRACE or CONNECT, even with every method allowed */
    assert_int_equal(match(r, "/x", CONFIG_METHOD_TRACE, &m), -405);
    assert_false(m.allow & (CONFIG_METHOD_TRACE | CONFIG_METHOD_CONNECT));
    assert_int_equal(match(r, "/x", CONFIG_METHOD_CONNECT, &m), -405);
    router_free(r);
}

static void test_several_params(void **state)
{
    config_route routes[] = {route("nested", "/orgs/:org/repos/:repo", NULL, CONFIG_METHOD_GET)};
    router_t *r = router_create(routes, 1);
    router_match m;
    assert_int_equal(match(r, "/orgs/acme/repos/gw", CONFIG_METHOD_GET, &m), 0);
    assert_int_equal(m.param_count, 2);
    assert_memory_equal(m.params[0].value, "acme", 4);
    assert_memory_equal(m.params[1].name, "repo", 4);
    assert_memory_equal(m.params[1].value, "gw", 2);
    assert_int_equal(match(r, "/orgs/acme/repo/gw", CONFIG_METHOD_GET, &m), -404);
    router_free(r);
}

static void test_no_routes(void **state)
{
    router_t *r = router_create(NULL, 0);
    router_match m;
    assert_non_null(r);
    assert_int_equal(match(r, "/", CONFIG_METHOD_GET, &m), -404);
    router_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_specificity),    cmocka_unit_test(test_ties_in_file_order),
        cmocka_unit_test(test_404_405_allow),  cmocka_unit_test(test_methods_default_all),
        cmocka_unit_test(test_several_params), cmocka_unit_test(test_no_routes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
