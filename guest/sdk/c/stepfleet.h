/*
 * stepfleet.h - single-header C SDK for stepfleet guest modules (guest ABI version 1).
 *
 * Contract: docs/guest-abi.md. Build a module with
 *   clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all -o wf.wasm wf.c
 *
 * Usage: include this header and define the entry point
 *
 *   const char *sf_workflow(const char *params);
 *
 * It receives the instance's params (JSON text) and returns the output (JSON text). The SDK
 * provides the module's exports (sf_abi_version, sf_alloc, sf_run) and replays the journal:
 * step_do() answers recorded steps inside the guest, runs the first unrecorded step and reports
 * it to the host, which then stops the guest. Returning from sf_workflow completes the instance.
 *
 * The workflow must be deterministic in *which* steps it asks for, given the journal; work
 * that is not deterministic belongs inside a step function, whose result is recorded.
 *
 * The implementation is compiled into the file that includes this header. A program split over
 * several .c files defines STEPFLEET_DECLARATIONS_ONLY before the include in all files but one.
 *
 * Memory handed out by the SDK (step results, instance id, sf_buf contents) is never freed by
 * the SDK: a module instance lives for one run only. Running out of memory traps, so the host
 * reports the memory limit instead of the workflow failing for good.
 */
#ifndef STEPFLEET_H
#define STEPFLEET_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The guest ABI version this SDK speaks; returned by the sf_abi_version export. */
#define SF_ABI_VERSION 1

/* Step function return codes. */
#define SF_OK 0              /* success: out holds the result, JSON text ("null" if empty) */
#define SF_ERROR 1           /* failure: out holds the message; the host may retry the step */
#define SF_ERROR_NO_RETRY 2  /* failure that must not be retried (step_failed flags bit 0) */

/* Log levels for sf_log. */
#define SF_LOG_DEBUG 0
#define SF_LOG_INFO 1
#define SF_LOG_WARN 2
#define SF_LOG_ERROR 3

/* Growable, always NUL-terminated byte buffer. Zero-initialise it (SF_BUF_INIT or {0}). */
typedef struct sf_buf {
    char *data; /* NULL until something is appended; use sf_buf_cstr() for a safe string */
    size_t len; /* bytes used, excluding the terminating NUL */
    size_t cap; /* bytes allocated */
} sf_buf;

#define SF_BUF_INIT {0, 0, 0}

/* A step function: reads its input (never NULL) and writes the result or error message to out.
 * Returns SF_OK, SF_ERROR or SF_ERROR_NO_RETRY (any other non-zero value counts as SF_ERROR). */
typedef int (*sf_step_fn)(const char *input, sf_buf *out);

/* ---- Provided by the tenant ------------------------------------------------------------ */

/* The workflow. params is the instance's params (JSON text). Return the output (JSON text) to
 * complete the instance, or end with `return sf_fail(msg);` to fail it. Returning NULL without
 * calling sf_fail fails the instance with "sf_workflow returned NULL". */
const char *sf_workflow(const char *params);

/* ---- Workflow API ------------------------------------------------------------------------ */

/* Runs step `name` at the current journal position.
 * Recorded success: returns the recorded result (NUL-terminated JSON) without running fn.
 * Recorded failure: returns NULL; sf_last_error() gives the recorded message.
 * Not recorded yet: runs fn(input, out) and reports the outcome to the host; never returns.
 * A recorded entry with another name or an unknown kind reports nondeterminism; never returns.
 * name must be 1 to 256 bytes of UTF-8 (the host checks). input may be NULL (fn then sees "").
 * Must not be called from inside a step function (that fails the instance). */
const char *step_do(const char *name, sf_step_fn fn, const char *input);

/* Message of the last step that step_do() answered as failed; "" after a successful step. */
const char *sf_last_error(void);

/* Fails the instance for good with msg (NULL means "workflow failed"); never returns.
 * Declared to return a string so a workflow can write `return sf_fail(msg);`.
 * Inside a step function return SF_ERROR_NO_RETRY instead: sf_fail fails the whole instance. */
__attribute__((noreturn)) const char *sf_fail(const char *msg);

/* Like sf_fail with a printf-style message. */
__attribute__((noreturn, format(printf, 1, 2))) const char *sf_failf(const char *fmt, ...);

/* Sends a log line at `level` (SF_LOG_*) to the host, formatted like sf_buf_printf. The host
 * bounds lines per run and their length. Lines logged by replayed workflow code repeat on every
 * run; log from inside step functions to log once. */
__attribute__((format(printf, 2, 3))) void sf_log(int level, const char *fmt, ...);

/* The instance id (NUL-terminated). Valid once sf_workflow has been called. */
const char *sf_instance_id(void);

/* ---- sf_buf -------------------------------------------------------------------------------- */

/* Appends len bytes of data. */
void sf_buf_append(sf_buf *b, const char *data, size_t len);

/* Appends the NUL-terminated string s (NULL appends nothing). */
void sf_buf_puts(sf_buf *b, const char *s);

/* Appends printf-style formatted text. Built in: flags - 0 + space #, width, precision, * and
 * length modifiers hh h l ll z j t; conversions d i u o x X c s p % and f F (at most 9
 * decimals). e E g G a A are not built in (they print as written): define
 * STEPFLEET_LIBC_PRINTF before the include to use wasi-libc's full vsnprintf, which makes the
 * module import wasi_snapshot_preview1 fd_write, fd_seek and fd_close (allowed, inert). */
__attribute__((format(printf, 2, 3))) void sf_buf_printf(sf_buf *b, const char *fmt, ...);

/* va_list form of sf_buf_printf. */
void sf_buf_vprintf(sf_buf *b, const char *fmt, va_list ap);

/* Appends s as a quoted, escaped JSON string (NULL appends null). */
void sf_buf_json_str(sf_buf *b, const char *s);

/* The contents as a NUL-terminated string; "" for an empty buffer. */
const char *sf_buf_cstr(const sf_buf *b);

/* Empties the buffer, keeping its allocation. */
void sf_buf_reset(sf_buf *b);

/* Releases the allocation and empties the buffer. */
void sf_buf_free(sf_buf *b);

/* ---- Minimal JSON readers (top-level keys of an object; first occurrence wins) ------------ */

/* The integer value of `key`, or def if json is not an object, the key is missing, or its value
 * is not a JSON integer that fits in a long long (fractions and exponents count as not). */
long long sf_json_int(const char *json, const char *key, long long def);

/* Copies the unescaped string value of `key` into buf (NUL-terminated, truncated to buflen-1
 * bytes like snprintf, which may cut a multi-byte character). Returns the full unescaped length, or -1 if json is not an object, the
 * key is missing, or its value is not a well-formed JSON string (buf is then set to ""). */
long sf_json_str(const char *json, const char *key, char *buf, size_t buflen);

#ifdef __cplusplus
}
#endif

/* ========================================================================================== */
#ifndef STEPFLEET_DECLARATIONS_ONLY

#include <limits.h>
#ifdef STEPFLEET_LIBC_PRINTF
#include <stdio.h>
#endif
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SF__IMPORT(n) __attribute__((import_module("stepfleet"), import_name(n)))
#define SF__EXPORT(n) __attribute__((export_name(n)))

SF__IMPORT("step_done")
void sf__host_step_done(int32_t seq, const char *name, int32_t name_len, const char *result,
                        int32_t result_len);
SF__IMPORT("step_failed")
void sf__host_step_failed(int32_t seq, const char *name, int32_t name_len, const char *msg,
                          int32_t msg_len, int32_t flags);
SF__IMPORT("complete")
void sf__host_complete(int32_t seq, const char *output, int32_t output_len);
SF__IMPORT("fail")
void sf__host_fail(int32_t seq, const char *msg, int32_t msg_len);
SF__IMPORT("nondeterminism")
void sf__host_nondeterminism(int32_t seq, int32_t op, const char *name, int32_t name_len);
SF__IMPORT("log")
void sf__host_log(int32_t level, const char *msg, int32_t msg_len);

#define SF__OP_STEP 1
#define SF__KIND_STEP_OK 1
#define SF__KIND_STEP_FAILED 2

/* Replay state for the current run. The buffer is read in place, entry by entry, so an entry
 * kind from a future ABI is only an error when the program actually reaches it. */
static struct {
    const unsigned char *cur, *end; /* unread part of the replay buffer */
    uint32_t entries_left;          /* journal entries not replayed yet */
    int32_t seq;                    /* journal position reached */
    const char *instance_id;
    const char *last_error;
    int in_step;
} sf__st = {0, 0, 0, 0, "", "", 0};

/* A terminal import returned: the host broke the contract, so stop here rather than continue. */
#define SF__AFTER_TERMINAL() __builtin_trap()

static void sf__log_raw(int level, const char *msg) {
    sf__host_log(level, msg, (int32_t)strlen(msg));
}

__attribute__((noreturn)) static void sf__oom(void) {
    sf__log_raw(SF_LOG_ERROR, "stepfleet: out of memory");
    __builtin_trap();
}

/* The host wrote a buffer this SDK cannot read: nothing sensible to report through the ABI. */
__attribute__((noreturn)) static void sf__corrupt(const char *what) {
    sf__log_raw(SF_LOG_ERROR, what);
    __builtin_trap();
}

static void *sf__xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) sf__oom();
    return p;
}

static char *sf__strndup(const char *s, size_t n) {
    char *p = (char *)sf__xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static uint32_t sf__read_u32(void) {
    if ((size_t)(sf__st.end - sf__st.cur) < 4) sf__corrupt("stepfleet: replay buffer truncated");
    const unsigned char *p = sf__st.cur;
    sf__st.cur += 4;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const char *sf__read_bytes(uint32_t *len) {
    *len = sf__read_u32();
    if ((size_t)(sf__st.end - sf__st.cur) < *len) sf__corrupt("stepfleet: replay buffer truncated");
    const char *p = (const char *)sf__st.cur;
    sf__st.cur += *len;
    return p;
}

SF__EXPORT("sf_abi_version") int32_t sf_abi_version(void) { return SF_ABI_VERSION; }

SF__EXPORT("sf_alloc") void *sf_alloc(int32_t len) {
    return len < 0 ? NULL : malloc(len ? (size_t)len : 1);
}

SF__EXPORT("sf_run") void sf_run(const unsigned char *ptr, int32_t len) {
    uint32_t n;
    sf__st.cur = ptr;
    sf__st.end = ptr + (len < 0 ? 0 : len);
    if (sf__read_u32() != SF_ABI_VERSION) sf__corrupt("stepfleet: replay buffer ABI version is not 1");
    const char *id = sf__read_bytes(&n);
    sf__st.instance_id = sf__strndup(id, n);
    const char *params_raw = sf__read_bytes(&n);
    const char *params = sf__strndup(params_raw, n);
    sf__st.entries_left = sf__read_u32();
    sf__st.seq = 0;

    const char *out = sf_workflow(params);
    if (!out) sf_fail("sf_workflow returned NULL");
    sf__host_complete(sf__st.seq, out, (int32_t)strlen(out));
    SF__AFTER_TERMINAL();
}

const char *step_do(const char *name, sf_step_fn fn, const char *input) {
    if (!name) name = "";
    size_t name_len = strlen(name);
    if (sf__st.in_step) sf_fail("step_do called inside a step function");

    if (sf__st.entries_left > 0) {
        if (sf__st.cur >= sf__st.end) sf__corrupt("stepfleet: replay buffer truncated");
        unsigned kind = *sf__st.cur++;
        if (kind != SF__KIND_STEP_OK && kind != SF__KIND_STEP_FAILED) {
            sf__host_nondeterminism(sf__st.seq, SF__OP_STEP, name, (int32_t)name_len);
            SF__AFTER_TERMINAL();
        }
        uint32_t rec_name_len, value_len;
        const char *rec_name = sf__read_bytes(&rec_name_len);
        const char *value = sf__read_bytes(&value_len);
        if (rec_name_len != name_len || memcmp(rec_name, name, name_len) != 0) {
            sf__host_nondeterminism(sf__st.seq, SF__OP_STEP, name, (int32_t)name_len);
            SF__AFTER_TERMINAL();
        }
        sf__st.seq++;
        sf__st.entries_left--;
        if (kind == SF__KIND_STEP_FAILED) {
            sf__st.last_error = sf__strndup(value, value_len);
            return NULL;
        }
        sf__st.last_error = "";
        return sf__strndup(value, value_len);
    }

    sf_buf out = SF_BUF_INIT;
    sf__st.in_step = 1;
    int rc = fn(input ? input : "", &out);
    sf__st.in_step = 0;
    if (rc == SF_OK) {
        const char *res = out.len ? out.data : "null";
        sf__host_step_done(sf__st.seq, name, (int32_t)name_len, res, (int32_t)strlen(res));
    } else {
        const char *msg = out.len ? out.data : "step failed";
        sf__host_step_failed(sf__st.seq, name, (int32_t)name_len, msg, (int32_t)strlen(msg),
                             rc == SF_ERROR_NO_RETRY ? 1 : 0);
    }
    SF__AFTER_TERMINAL();
}

const char *sf_last_error(void) { return sf__st.last_error; }

const char *sf_fail(const char *msg) {
    if (!msg) msg = "workflow failed";
    sf__host_fail(sf__st.seq, msg, (int32_t)strlen(msg));
    SF__AFTER_TERMINAL();
}

const char *sf_failf(const char *fmt, ...) {
    sf_buf b = SF_BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    sf_buf_vprintf(&b, fmt, ap);
    va_end(ap);
    sf_fail(sf_buf_cstr(&b));
}

void sf_log(int level, const char *fmt, ...) {
    sf_buf b = SF_BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    sf_buf_vprintf(&b, fmt, ap);
    va_end(ap);
    sf__host_log(level, sf_buf_cstr(&b), (int32_t)b.len);
    sf_buf_free(&b);
}

const char *sf_instance_id(void) { return sf__st.instance_id; }

/* ---- sf_buf ---- */

static void sf__buf_reserve(sf_buf *b, size_t extra) {
    if (extra >= SIZE_MAX - b->len) sf__oom();
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = (char *)realloc(b->data, cap);
    if (!p) sf__oom();
    b->data = p;
    b->cap = cap;
}

void sf_buf_append(sf_buf *b, const char *data, size_t len) {
    sf__buf_reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void sf_buf_puts(sf_buf *b, const char *s) {
    if (s) sf_buf_append(b, s, strlen(s));
}

#ifdef STEPFLEET_LIBC_PRINTF
void sf_buf_vprintf(sf_buf *b, const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n <= 0) return;
    sf__buf_reserve(b, (size_t)n);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}
#else
static void sf__pad(sf_buf *b, char c, int n) {
    for (; n > 0; n--) sf_buf_append(b, &c, 1);
}

/* Emits one conversion: prefix (sign, 0x), body padded to prec digits, then to width. */
static void sf__field(sf_buf *b, const char *prefix, const char *body, int body_len, int prec,
                      int width, int left, int zero) {
    int pre_len = (int)strlen(prefix);
    int zeros = prec > body_len ? prec - body_len : 0;
    int pad = width - pre_len - zeros - body_len;
    if (!left && !zero) sf__pad(b, ' ', pad);
    sf_buf_puts(b, prefix);
    if (!left && zero) sf__pad(b, '0', pad);
    sf__pad(b, '0', zeros);
    sf_buf_append(b, body, (size_t)body_len);
    if (left) sf__pad(b, ' ', pad);
}

/* Digits of a %f conversion of |x| (sign handled by the caller). Exact for |x| < 2^64; larger
 * magnitudes print approximately. Precision is capped at 9 so the scaled fraction stays exact. */
static int sf__fmt_f(char *out, double x, int prec, int alt) {
    static const double pow10[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9};
    char rev[320];
    int n = 0, r = 0;
    double v = x < 0 ? -x : x;
    unsigned long long ip = 0, frac = 0;
    if (prec > 9) prec = 9;
    if (v < 18446744073709551616.0) {
        ip = (unsigned long long)v;
        double f = v - (double)ip, scaled = f * pow10[prec], whole = __builtin_floor(scaled);
        frac = (unsigned long long)whole;
        if (scaled - whole > 0.5) {
            frac++;
        } else if (scaled - whole == 0.5) {
            /* The product may have rounded onto the tie: its exact error (Dekker's product,
             * no FMA needed) says which way the true value lies. An exact tie rounds to even,
             * as printf does for 2.5. */
            double fc = 134217729.0 * f, fh = fc - (fc - f), fl = f - fh;
            double pc = 134217729.0 * pow10[prec], ph = pc - (pc - pow10[prec]), pl = pow10[prec] - ph;
            double err = ((fh * ph - scaled) + fh * pl + fl * ph) + fl * pl;
            if (err > 0 || (err == 0 && (prec ? frac : ip) % 2)) frac++;
        }
        if (frac >= (unsigned long long)pow10[prec]) ip++, frac -= (unsigned long long)pow10[prec];
        do rev[r++] = (char)('0' + ip % 10); while (ip /= 10);
    } else {
        for (; v >= 1 && r < (int)sizeof rev; v = __builtin_floor(v / 10))
            rev[r++] = (char)('0' + (int)(v - __builtin_floor(v / 10) * 10));
    }
    while (r) out[n++] = rev[--r];
    if (prec > 0 || alt) out[n++] = '.';
    for (int i = prec - 1; i >= 0; i--, frac /= 10) out[n + i] = (char)('0' + frac % 10);
    return n + prec;
}

/* A small printf: flags - 0 + space #, width and precision (or *), length hh h l ll z j t,
 * conversions d i u o x X c s p % and f F (at most 9 decimals). e E g G a A consume their
 * argument but print as written. Define STEPFLEET_LIBC_PRINTF to use wasi-libc's vsnprintf
 * instead: full printf, but the module then imports fd_write, fd_seek and fd_close. */
void sf_buf_vprintf(sf_buf *b, const char *fmt, va_list ap) {
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            const char *q = p;
            while (*q && *q != '%') q++;
            sf_buf_append(b, p, (size_t)(q - p));
            p = q - 1;
            continue;
        }
        int left = 0, zero = 0, plus = 0, space = 0, alt = 0, width = 0, prec = -1;
        for (;; p++) {
            char f = p[1];
            if (f == '-') left = 1;
            else if (f == '0') zero = 1;
            else if (f == '+') plus = 1;
            else if (f == ' ') space = 1;
            else if (f == '#') alt = 1;
            else break;
        }
        p++;
        if (*p == '*') {
            width = va_arg(ap, int);
            if (width < 0) left = 1, width = -width;
            p++;
        } else {
            while (*p >= '0' && *p <= '9') width = width * 10 + (*p++ - '0');
        }
        if (*p == '.') {
            p++;
            prec = 0;
            if (*p == '*') {
                prec = va_arg(ap, int);
                p++;
            } else {
                while (*p >= '0' && *p <= '9') prec = prec * 10 + (*p++ - '0');
            }
        }
        int len = 0; /* -2 hh, -1 h, 0 int, 1 long, 2 long long, 3 size_t/intmax_t/ptrdiff_t */
        if (*p == 'h') len = p[1] == 'h' ? (p++, -2) : -1, p++;
        else if (*p == 'l') len = p[1] == 'l' ? (p++, 2) : 1, p++;
        else if (*p == 'z' || *p == 't') len = 3, p++;
        else if (*p == 'j') len = 4, p++;
        if (left) zero = 0;

        char conv = *p, digits[24], *d = digits + sizeof digits;
        const char *prefix = "";
        unsigned long long v = 0;
        unsigned base = 10;
        if (!conv) break;
        switch (conv) {
        case '%': sf_buf_append(b, "%", 1); continue;
        case 'c': {
            char c = (char)va_arg(ap, int);
            sf__field(b, "", &c, 1, -1, width, left, 0);
            continue;
        }
        case 's': {
            const char *s = va_arg(ap, const char *);
            int n = 0;
            if (!s) s = "(null)";
            while (s[n] && (prec < 0 || n < prec)) n++;
            sf__field(b, "", s, n, -1, width, left, 0);
            continue;
        }
        case 'd': case 'i': {
            long long sv;
            if (len == 2 || len == 4) sv = va_arg(ap, long long);
            else if (len == 1) sv = va_arg(ap, long);
            else if (len == 3) sv = (long long)va_arg(ap, ptrdiff_t);
            else sv = va_arg(ap, int);
            if (len == -1) sv = (short)sv;
            if (len == -2) sv = (signed char)sv;
            v = sv < 0 ? 0 - (unsigned long long)sv : (unsigned long long)sv;
            prefix = sv < 0 ? "-" : plus ? "+" : space ? " " : "";
            break;
        }
        case 'f': case 'F': {
            double x = va_arg(ap, double);
            char body[340];
            int n;
            prefix = __builtin_signbit(x) ? "-" : plus ? "+" : space ? " " : "";
            if (__builtin_isnan(x) || __builtin_isinf(x)) {
                n = 3;
                memcpy(body, __builtin_isnan(x) ? (conv == 'F' ? "NAN" : "nan") : (conv == 'F' ? "INF" : "inf"), 3);
                zero = 0;
            } else {
                n = sf__fmt_f(body, x, prec < 0 ? 6 : prec, alt);
            }
            sf__field(b, prefix, body, n, -1, width, left, zero);
            continue;
        }
        case 'e': case 'E': case 'g': case 'G': case 'a': case 'A':
            (void)va_arg(ap, double); /* keeps later arguments in step */
            sf_buf_append(b, "%", 1);
            sf_buf_append(b, &conv, 1);
            continue;
        case 'u': case 'o': case 'x': case 'X': case 'p':
            if (conv == 'p') v = (uintptr_t)va_arg(ap, void *), prec = prec < 0 ? 1 : prec, alt = 1;
            else if (len == 2 || len == 4) v = va_arg(ap, unsigned long long);
            else if (len == 1) v = va_arg(ap, unsigned long);
            else if (len == 3) v = va_arg(ap, size_t);
            else v = va_arg(ap, unsigned);
            if (len == -1) v = (unsigned short)v;
            if (len == -2) v = (unsigned char)v;
            base = conv == 'o' ? 8 : conv == 'u' ? 10 : 16;
            if (alt && base == 16 && (v || conv == 'p')) prefix = conv == 'X' ? "0X" : "0x";
            break;
        default: /* unknown conversion: keep it visible rather than consume an argument */
            sf_buf_append(b, "%", 1);
            sf_buf_append(b, &conv, 1);
            continue;
        }
        for (unsigned long long t = v; t; t /= base) *--d = (conv == 'X' ? "0123456789ABCDEF" : "0123456789abcdef")[t % base];
        if (conv == 'o' && alt && *d != '0') *--d = '0';
        if (prec < 0 && d == digits + sizeof digits) *--d = '0'; /* zero prints "0" unless .0 */
        if (prec >= 0) zero = 0;
        sf__field(b, prefix, d, (int)(digits + sizeof digits - d), prec, width, left, zero);
    }
}
#endif

void sf_buf_printf(sf_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sf_buf_vprintf(b, fmt, ap);
    va_end(ap);
}

void sf_buf_json_str(sf_buf *b, const char *s) {
    static const char hex[] = "0123456789abcdef";
    if (!s) {
        sf_buf_append(b, "null", 4);
        return;
    }
    sf_buf_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        switch (*p) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            if (*p < 0x20) {
                esc[1] = 'u', esc[2] = '0', esc[3] = '0', esc[4] = hex[*p >> 4], esc[5] = hex[*p & 15];
                sf_buf_append(b, esc, 6);
            } else {
                sf_buf_append(b, (const char *)p, 1);
            }
            continue;
        }
        sf_buf_append(b, esc, 2);
    }
    sf_buf_append(b, "\"", 1);
}

const char *sf_buf_cstr(const sf_buf *b) { return b->data ? b->data : ""; }

void sf_buf_reset(sf_buf *b) {
    b->len = 0;
    if (b->data) b->data[0] = '\0';
}

void sf_buf_free(sf_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ---- JSON ---- */

static const char *sf__json_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

static int sf__hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

/* Decodes the JSON string starting at the opening quote p into out (at most cap bytes written,
 * no NUL). Returns the full decoded length, or -1 if malformed; *end is set past the close. */
static long sf__json_decode_str(const char *p, char *out, size_t cap, const char **end) {
    size_t n = 0;
    if (*p++ != '"') return -1;
    for (;;) {
        unsigned char c = (unsigned char)*p++;
        unsigned cp;
        if (c == '"') break;
        if (c < 0x20) return -1; /* includes the NUL terminator: unterminated string */
        if (c != '\\') {
            if (n < cap) out[n] = (char)c;
            n++;
            continue;
        }
        switch (*p++) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (!sf__hex4(p, &cp)) return -1;
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (p[0] != '\\' || p[1] != 'u' || !sf__hex4(p + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return -1;
                p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return -1;
            }
            break;
        default: return -1;
        }
        unsigned char u[4];
        size_t k;
        if (cp < 0x80) u[0] = (unsigned char)cp, k = 1;
        else if (cp < 0x800) u[0] = (unsigned char)(0xC0 | cp >> 6), u[1] = (unsigned char)(0x80 | (cp & 63)), k = 2;
        else if (cp < 0x10000)
            u[0] = (unsigned char)(0xE0 | cp >> 12), u[1] = (unsigned char)(0x80 | (cp >> 6 & 63)),
            u[2] = (unsigned char)(0x80 | (cp & 63)), k = 3;
        else
            u[0] = (unsigned char)(0xF0 | cp >> 18), u[1] = (unsigned char)(0x80 | (cp >> 12 & 63)),
            u[2] = (unsigned char)(0x80 | (cp >> 6 & 63)), u[3] = (unsigned char)(0x80 | (cp & 63)), k = 4;
        for (size_t i = 0; i < k; i++, n++)
            if (n < cap) out[n] = (char)u[i];
    }
    *end = p;
    return (long)n;
}

/* Skips one JSON value; returns the position after it, or NULL if malformed. Containers are
 * skipped by bracket depth, which is enough to find the next top-level key in valid JSON. */
static const char *sf__json_skip(const char *p) {
    const char *e, *start;
    int depth = 0;
    p = sf__json_ws(p);
    start = p;
    do {
        if (*p == '"') {
            if (sf__json_decode_str(p, NULL, 0, &e) < 0) return NULL;
            p = e;
        } else if (*p == '{' || *p == '[') {
            depth++, p++;
        } else if (*p == '}' || *p == ']') {
            if (--depth < 0) return NULL;
            p++;
        } else if (*p == '\0') {
            return NULL;
        } else if (depth > 0) {
            p++;
        } else {
            while (*p && !strchr(",}] \t\r\n", *p)) p++; /* number or literal */
        }
    } while (depth > 0);
    return p == start ? NULL : p;
}

/* Returns the start of the value of top-level `key` in object json, or NULL. */
static const char *sf__json_find(const char *json, const char *key) {
    if (!json || !key) return NULL;
    const char *p = sf__json_ws(json), *e;
    size_t key_len = strlen(key);
    if (*p++ != '{') return NULL;
    p = sf__json_ws(p);
    if (*p == '}') return NULL;
    for (;;) {
        if (*p != '"') return NULL;
        /* Decoded keys are never longer than their escaped form, so this buffer suffices. */
        const char *q = p + 1;
        while (*q && *q != '"') q += (*q == '\\' && q[1]) ? 2 : 1;
        char *tmp = (char *)sf__xmalloc((size_t)(q - p) + 1);
        long n = sf__json_decode_str(p, tmp, (size_t)(q - p), &e);
        int match = n >= 0 && (size_t)n == key_len && memcmp(tmp, key, key_len) == 0;
        free(tmp);
        if (n < 0) return NULL;
        p = sf__json_ws(e);
        if (*p++ != ':') return NULL;
        p = sf__json_ws(p);
        if (match) return p;
        if (!(p = sf__json_skip(p))) return NULL;
        p = sf__json_ws(p);
        if (*p++ != ',') return NULL;
        p = sf__json_ws(p);
    }
}

long long sf_json_int(const char *json, const char *key, long long def) {
    const char *p = sf__json_find(json, key);
    if (!p) return def;
    int neg = *p == '-';
    if (neg) p++;
    if (*p < '0' || *p > '9' || (*p == '0' && p[1] >= '0' && p[1] <= '9')) return def;
    unsigned long long v = 0, limit = neg ? (unsigned long long)LLONG_MAX + 1 : LLONG_MAX;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (limit - d) / 10) return def;
        v = v * 10 + d;
    }
    if (*p == '.' || *p == 'e' || *p == 'E') return def;
    return neg ? (long long)(0 - v) : (long long)v;
}

long sf_json_str(const char *json, const char *key, char *buf, size_t buflen) {
    const char *p = sf__json_find(json, key), *e;
    long n = (p && *p == '"') ? sf__json_decode_str(p, buf, buflen ? buflen - 1 : 0, &e) : -1;
    if (buflen) buf[n < 0 ? 0 : ((size_t)n < buflen ? (size_t)n : buflen - 1)] = '\0';
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* STEPFLEET_DECLARATIONS_ONLY */
#endif /* STEPFLEET_H */
