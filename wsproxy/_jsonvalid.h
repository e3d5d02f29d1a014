/*
 * _jsonvalid.h -- strict RFC 8259 JSON validator and RFC 3629 UTF-8 validator.
 *
 * Header-only, portable C99, no allocation, no recursion.  Both functions take
 * a pointer and a length and never read outside p[0..n): they are called
 * directly on a WebSocket frame's payload, which is not NUL-terminated.
 *
 *   int wsp_utf8_valid(const unsigned char *p, size_t n);
 *       1 if p[0..n) is valid UTF-8 (no overlong forms, no surrogates
 *       U+D800..U+DFFF, nothing above U+10FFFF), else 0.
 *
 *   int wsp_json_valid(const unsigned char *p, size_t n);
 *       1 if p[0..n) is exactly one JSON text (any top-level value; leading
 *       and trailing whitespace limited to space, \t, \n, \r) and is valid
 *       UTF-8, else 0.  Arrays/objects nested deeper than WSP_JSON_MAX_DEPTH
 *       are rejected.  Strictness beyond the grammar: a \u escape that
 *       decodes to an unpaired surrogate is rejected, because the text could
 *       not be re-encoded as UTF-8 by any consumer.
 *
 * Both functions are pure and thread-safe; they can be called without the GIL.
 */
#ifndef WSP_JSONVALID_H
#define WSP_JSONVALID_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Nesting depth of arrays/objects that is still accepted; one deeper -> 0. */
#define WSP_JSON_MAX_DEPTH 1024

/* ------------------------------------------------------------------------ */
/* SWAR (SIMD-within-a-register) helpers                                     */
/* ------------------------------------------------------------------------ */

#define WSP__ONES  UINT64_C(0x0101010101010101)
#define WSP__HIGHS UINT64_C(0x8080808080808080)

/* memcpy is the portable way to do an unaligned, aliasing-safe 8-byte load;
 * gcc/clang compile it to a single mov. */
static inline uint64_t wsp__load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/*
 * Flag (high bit of the byte) every byte of v that needs attention inside a
 * JSON string: '"', '\\', a control character (< 0x20) or a non-ASCII byte
 * (>= 0x80).
 *
 * These are the classic "haszero"/"hasless" tricks: (x - 0x01..) & ~x & 0x80..
 * is non-zero iff some byte of x is zero, and (x - n*0x01..) & ~x & 0x80.. iff
 * some byte is < n (valid for n <= 0x80).  The subtraction's borrow can only
 * travel toward more significant bytes and only out of a byte that really
 * matched, so bytes *below* the first real match are never flagged: the
 * lowest flagged byte is always exact, higher flags may be false positives.
 * We only ever use "is anything flagged" and "where is the lowest flag".
 */
static inline uint64_t wsp__str_special(uint64_t v)
{
    uint64_t q  = v ^ (WSP__ONES * 0x22u);          /* zero byte where '"'  */
    uint64_t bs = v ^ (WSP__ONES * 0x5Cu);          /* zero byte where '\\' */
    uint64_t ctl = (v - WSP__ONES * 0x20u) & ~v;    /* byte < 0x20          */
    uint64_t hq  = (q - WSP__ONES) & ~q;
    uint64_t hbs = (bs - WSP__ONES) & ~bs;
    /* "| v" flags bytes >= 0x80; those are also why ~v is needed above. */
    return (ctl | hq | hbs | v) & WSP__HIGHS;
}

/*
 * Byte offset (in memory order) of the lowest-addressed flagged byte of a
 * non-zero mask produced by the helpers above.  On little-endian gcc/clang
 * that is the least significant flag, found with one ctz.  Elsewhere we have
 * no portable bit scan (and on big-endian the lowest address is the most
 * significant byte, where borrow false positives live), so return 0 and let
 * the caller's byte-at-a-time path walk to the interesting byte.  Callers
 * must therefore treat the returned position as "at or before" the match.
 */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) \
    && (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
#define WSP__HAVE_CTZ_LE 1
#endif

static inline size_t wsp__first_flag(uint64_t mask)
{
#ifdef WSP__HAVE_CTZ_LE
    return (size_t)__builtin_ctzll(mask) >> 3;
#else
    (void)mask;
    return 0;
#endif
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                     */
/* ------------------------------------------------------------------------ */

/*
 * p < end and *p >= 0x80.  Return the length (2..4) of the well-formed
 * sequence starting at p, or 0 if it is malformed or truncated by end.
 * The second-byte ranges are RFC 3629's table: they are what exclude
 * overlongs (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and code points
 * above U+10FFFF (F4 90..BF, F5..FF).
 */
static inline size_t wsp__utf8_seq(const unsigned char *p, const unsigned char *end)
{
    size_t avail = (size_t)(end - p);
    unsigned c = p[0];
    unsigned lo = 0x80, hi = 0xBF;              /* allowed range of p[1] */

    if (c < 0xC2)                               /* 80..BF stray continuation, */
        return 0;                               /* C0/C1 always overlong      */
    if (c < 0xE0)
        return (avail >= 2 && (p[1] & 0xC0u) == 0x80u) ? 2 : 0;
    if (c < 0xF0) {
        if (avail < 3)
            return 0;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        if (p[1] < lo || p[1] > hi || (p[2] & 0xC0u) != 0x80u)
            return 0;
        return 3;
    }
    if (c < 0xF5) {
        if (avail < 4)
            return 0;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        if (p[1] < lo || p[1] > hi || (p[2] & 0xC0u) != 0x80u
            || (p[3] & 0xC0u) != 0x80u)
            return 0;
        return 4;
    }
    return 0;
}

static inline int wsp_utf8_valid(const unsigned char *p, size_t n)
{
    const unsigned char *end;

    if (n == 0)             /* also avoids NULL + 0 for an empty buffer */
        return 1;
    end = p + n;
    while (p < end) {
        /* ASCII fast path: 16 bytes per iteration while nothing has its
         * high bit set.  OR-ing the two words first keeps it one branch. */
        while ((size_t)(end - p) >= 16) {
            uint64_t a = wsp__load64(p) & WSP__HIGHS;
            uint64_t b = wsp__load64(p + 8) & WSP__HIGHS;
            if (a | b) {
                /* Jump straight to the first non-ASCII byte (exact here: no
                 * arithmetic, so no borrow false positives). */
                p += a ? wsp__first_flag(a) : 8 + wsp__first_flag(b);
                break;
            }
            p += 16;
        }
        if (p == end)
            break;
        if (*p < 0x80) {
            /* tail shorter than 16 bytes, or no ctz on this platform */
            p++;
            continue;
        }
        /* Non-ASCII text comes in runs (CJK, Cyrillic...): stay in this
         * loop until the run ends instead of re-probing 16 bytes per
         * character. */
        do {
            size_t k = wsp__utf8_seq(p, end);
            if (k == 0)
                return 0;
            p += k;
        } while (p < end && *p >= 0x80);
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* JSON                                                                      */
/* ------------------------------------------------------------------------ */

/* Bit i set <=> byte i is JSON whitespace (only i <= 0x20 is ever tested). */
#define WSP__WS_MASK ((UINT64_C(1) << ' ') | (UINT64_C(1) << '\t') \
                      | (UINT64_C(1) << '\n') | (UINT64_C(1) << '\r'))

static inline const unsigned char *
wsp__skip_ws(const unsigned char *p, const unsigned char *end)
{
    /* The common case is "no whitespace at all" (compact JSON): a single
     * compare against ' ' rejects every token-start byte. */
    while (p < end && *p <= ' ' && ((WSP__WS_MASK >> *p) & 1u))
        p++;
    return p;
}

static inline int wsp__is_digit(unsigned c)
{
    return (c - '0') < 10u;     /* unsigned wrap makes this one compare */
}

/* Value of one hex digit, or -1. */
static inline int wsp__hexval(unsigned c)
{
    if ((c - '0') < 10u)
        return (int)(c - '0');
    c |= 0x20u;                 /* fold 'A'..'F' to 'a'..'f' */
    if ((c - 'a') < 6u)
        return (int)(c - 'a') + 10;
    return -1;
}

/* The 16-bit code unit of the 4 hex digits at p, or -1 (also if truncated). */
static inline long wsp__hex4(const unsigned char *p, const unsigned char *end)
{
    int a, b, c, d;
    if ((size_t)(end - p) < 4)
        return -1;
    a = wsp__hexval(p[0]);
    b = wsp__hexval(p[1]);
    c = wsp__hexval(p[2]);
    d = wsp__hexval(p[3]);
    if ((a | b | c | d) < 0)    /* any -1 sets the sign bit of the OR */
        return -1;
    return ((long)a << 12) | ((long)b << 8) | ((long)c << 4) | (long)d;
}

/*
 * p points just past the opening quote.  Return a pointer just past the
 * closing quote, or NULL if the string is invalid or unterminated.
 */
static inline const unsigned char *
wsp__scan_string(const unsigned char *p, const unsigned char *end)
{
    for (;;) {
        /* Skip 8 ordinary bytes at a time; on a hit, land on (or, without
         * ctz, before) the first byte that needs a closer look. */
        while ((size_t)(end - p) >= 8) {
            uint64_t m = wsp__str_special(wsp__load64(p));
            if (m) {
                p += wsp__first_flag(m);
                break;
            }
            p += 8;
        }
        if (p == end)
            return NULL;                        /* unterminated */

        switch (*p) {
        case '"':
            return p + 1;

        case '\\': {
            long u;
            if ((size_t)(end - p) < 2)
                return NULL;
            switch (p[1]) {
            case '"': case '\\': case '/':
            case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                continue;
            case 'u':
                break;
            default:
                return NULL;
            }
            u = wsp__hex4(p + 2, end);
            if (u < 0)
                return NULL;
            p += 6;
            if (u >= 0xD800 && u <= 0xDBFF) {
                /* A high surrogate only means something as the first half
                 * of a pair, so the very next thing must be a \uDC00-DFFF
                 * escape (raw UTF-8 cannot encode the low half). */
                long lo;
                if ((size_t)(end - p) < 6 || p[0] != '\\' || p[1] != 'u')
                    return NULL;
                lo = wsp__hex4(p + 2, end);
                if (lo < 0xDC00 || lo > 0xDFFF)     /* also catches -1 */
                    return NULL;
                p += 6;
            } else if (u >= 0xDC00 && u <= 0xDFFF) {
                return NULL;                        /* lone low surrogate */
            }
            continue;
        }

        default:
            if (*p >= 0x80) {
                /* Stay here for a whole run of non-ASCII characters
                 * (see wsp_utf8_valid). */
                do {
                    size_t k = wsp__utf8_seq(p, end);
                    if (k == 0)
                        return NULL;
                    p += k;
                } while (p < end && *p >= 0x80);
            } else if (*p < 0x20) {
                return NULL;            /* RFC 8259 7: must be escaped */
            } else {
                p++;                    /* ordinary byte: tail < 8 bytes or
                                         * no-ctz fallback */
            }
            continue;
        }
    }
}

/*
 * *p is '-' or a digit.  Grammar: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?
 * Returns a pointer past the number or NULL.  What may follow (e.g. the "1"
 * of "01") is the caller's business: anything but whitespace, ',', ']', '}'
 * or end of input fails there.
 */
static inline const unsigned char *
wsp__scan_number(const unsigned char *p, const unsigned char *end)
{
    if (*p == '-') {
        if (++p == end)
            return NULL;
    }
    if (*p == '0') {
        p++;
    } else if (wsp__is_digit(*p)) {
        do
            p++;
        while (p < end && wsp__is_digit(*p));
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        if (p == end || !wsp__is_digit(*p))
            return NULL;
        do
            p++;
        while (p < end && wsp__is_digit(*p));
    }
    if (p < end && (*p | 0x20u) == 'e') {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p == end || !wsp__is_digit(*p))
            return NULL;
        do
            p++;
        while (p < end && wsp__is_digit(*p));
    }
    return p;
}

static inline int wsp_json_valid(const unsigned char *p, size_t n)
{
    /*
     * Explicit stack instead of recursion: closers[i] is the byte that closes
     * the container open at depth i (']' or '}').  Storing the closer rather
     * than a type bit makes the close check a single compare, and writing a
     * whole byte per push means nothing is ever read before being written.
     */
    unsigned char closers[WSP_JSON_MAX_DEPTH];
    size_t depth = 0;
    const unsigned char *end;

    if (n == 0)
        return 0;
    end = p + n;
    p = wsp__skip_ws(p, end);

value:  /* expect a value at p (whitespace already skipped) */
    if (p == end)
        return 0;
    switch (*p) {
    case '{':
    case '[':
        if (depth == WSP_JSON_MAX_DEPTH)
            return 0;       /* bounded stack: deep input fails fast, O(depth) */
        closers[depth++] = (unsigned char)(*p + 2);     /* '{'+2=='}', '['+2==']' */
        p = wsp__skip_ws(p + 1, end);
        if (p == end)
            return 0;
        if (*p == closers[depth - 1]) {                 /* empty {} or [] */
            depth--;
            p++;
            goto after_value;
        }
        if (closers[depth - 1] == '}')
            goto object_key;
        goto value;
    case '"':
        p = wsp__scan_string(p + 1, end);
        break;
    case 't':
        if ((size_t)(end - p) < 4 || memcmp(p, "true", 4) != 0)
            return 0;
        p += 4;
        break;
    case 'f':
        if ((size_t)(end - p) < 5 || memcmp(p, "false", 5) != 0)
            return 0;
        p += 5;
        break;
    case 'n':
        if ((size_t)(end - p) < 4 || memcmp(p, "null", 4) != 0)
            return 0;
        p += 4;
        break;
    case '-':
    case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
        p = wsp__scan_number(p, end);
        break;
    default:
        /* Everything else, including NaN/Infinity, '+', '.', quotes other
         * than '"', comments, and any byte >= 0x80 (non-ASCII is only legal
         * inside strings). */
        return 0;
    }
    if (p == NULL)
        return 0;

after_value:  /* a complete value ends just before p */
    p = wsp__skip_ws(p, end);
    if (depth == 0)
        return p == end;                /* anything left is trailing garbage */
    if (p == end)
        return 0;
    if (*p == ',') {
        p = wsp__skip_ws(p + 1, end);
        if (closers[depth - 1] == ']')
            goto value;                 /* "[1,]" fails in value: ']' */
        goto object_key;                /* "{..,}" fails in object_key */
    }
    if (*p != closers[depth - 1])
        return 0;                       /* also rejects "[1}" and "{"a":1]" */
    depth--;
    p++;
    goto after_value;

object_key:  /* expect "key" : at p (whitespace already skipped) */
    if (p == end || *p != '"')
        return 0;
    p = wsp__scan_string(p + 1, end);
    if (p == NULL)
        return 0;
    p = wsp__skip_ws(p, end);
    if (p == end || *p != ':')
        return 0;
    p = wsp__skip_ws(p + 1, end);
    goto value;
}

#endif /* WSP_JSONVALID_H */
