/*
 * encoding.h - Accept-Encoding (RFC 9110 §12.5.3) parsing and the choice of a
 * content coding for a response the gateway compresses. Pure functions: no
 * state, no allocation, callable from any thread. The header value is only
 * read, never past its terminating NUL, in one pass per call.
 *
 * Rules where the RFC leaves room (the unit tests pin each one):
 *  - An element that does not match `token *( OWS ";" OWS [ param ] )` is
 *    ignored as if absent; the other elements still count. That covers a
 *    malformed qvalue (q=2, q=0.5555, q=1.5, q=abc, q="1", "q = 1"), a bad
 *    byte in the coding or a parameter, an unterminated quoted-string and two
 *    tokens without a separator ("gzip br"). Elements are split at commas
 *    outside quoted-strings before they are judged.
 *  - A coding listed more than once counts by its first valid element;
 *    "x-gzip" and "gzip" are the same coding (§8.4.1.3); so are two "*".
 *  - Parameters other than q are skipped; if q appears twice in one element
 *    the first counts (both must be well-formed).
 *  - `*` gives its q to every coding not listed by name, identity included.
 *  - Identity does not compete with the codings: a coding with q > 0 is chosen
 *    even when the client gives identity a higher q ("identity;q=1, gzip;q=0.1"
 *    answers gzip), as the other servers do.
 */
#ifndef GATEWAY_ENCODING_H
#define GATEWAY_ENCODING_H

#include <stdbool.h>
#include <stddef.h>

#define GW_ENCODING_Q_MAX 1000 /* q=1 in thousandths */

typedef enum { GW_ENC_IDENTITY = 0, GW_ENC_GZIP = 1, GW_ENC_BR = 2 } gw_encoding;

/* The coding for a response, given the request's Accept-Encoding value
 * (borrowed; several header lines joined by ", "; NULL when absent) and the
 * server's preference order `prefs` (borrowed, pref_count entries, e.g.
 * {GW_ENC_BR, GW_ENC_GZIP} from compression.algorithms; GW_ENC_IDENTITY and
 * unknown values in it are skipped).
 *
 * Among the prefs with q > 0 (their own, or `*`'s when not listed by name) the
 * highest q wins, ties going to the earlier pref: "gzip, deflate, br" gives br
 * for {BR, GZIP}. GW_ENC_IDENTITY when none is acceptable, the header is absent,
 * empty ("" means only identity is acceptable) or has no valid element.
 *
 * identity_refused (may be NULL) is always written: true when the answer is
 * GW_ENC_IDENTITY although the header refuses identity ("identity;q=0", or
 * "*;q=0" without identity listed). RFC 9110 lets the server send identity
 * anyway; the caller may answer 406 instead. */
gw_encoding gw_encoding_choose(const char *accept_encoding, const gw_encoding *prefs, size_t pref_count,
                               bool *identity_refused);

/* The q-value in thousandths (0..GW_ENCODING_Q_MAX) the header gives the coding
 * `name` (a token, compared case-insensitively; "x-gzip" = "gzip"): from its
 * first valid element, else from `*`'s; -1 when neither is present, when the
 * header is NULL, or when name is NULL or not a token. The q of "*" itself is
 * asked with name "*". Both strings are borrowed. */
int gw_accept_encoding_q(const char *accept_encoding, const char *name);

/* "identity", "gzip" or "br" (static strings); "identity" for any other value.
 * Only a non-identity coding belongs in a Content-Encoding header. */
const char *gw_encoding_name(gw_encoding e);

#endif
