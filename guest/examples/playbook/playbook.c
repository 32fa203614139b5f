/*
 * Playbook workflow: a program interpreted from its params, so that one module can exercise
 * every primitive of the guest ABI (steps with retries, timeouts, rollbacks and sensitive
 * results, sleeps, events, now, random, failing, HTTP calls inside a step). The host's tests drive it; see README.md for
 * the params and the output.
 *
 * Every op is checked before the first primitive runs, so invalid params fail the instance at
 * once (journal position 0) with a message naming the op and the field.
 */
#include "stepfleet.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NAME_BYTES 256 /* names and event types: 1 to 256 bytes, as the host allows */
#define RANDOM_BYTES 256

#define HTTP_REPEAT_MAX 100

enum { OP_DO, OP_SLEEP, OP_SLEEP_UNTIL, OP_WAIT, OP_NOW, OP_RANDOM, OP_FAIL, OP_HTTP };

static const char *const OP_NAMES[] = {"do",  "sleep", "sleep_until", "wait",
                                       "now", "random", "fail", "http"};

/* The fields each op may have, space-separated and space-enclosed. */
static const char *const OP_FIELDS[] = {
    (" op name fail_times non_retryable retries timeout_ms spin rollback rollback_fails sensitive"
     " propagate now_inside "),
    " op name ms ",
    " op name at_ms ",
    " op name type timeout_ms propagate ",
    " op name ",
    " op name bytes ",
    " op name message ",
    " op name method url headers body repeat timeout_ms with_headers ",
};

typedef struct op {
    int kind;
    char name[NAME_BYTES + 1]; /* "" only for a fail op without a name */
    char *text;                /* the op object's JSON: the input of its step function */
    sf_step_config config;     /* do */
    int rollback, rollback_fails, propagate;
    long long ms;              /* sleep: duration; sleep_until: Unix ms */
    char type[NAME_BYTES + 1]; /* wait */
    long long timeout_ms;      /* wait: -1 for the host default */
    long long bytes;           /* random */
    char *message;             /* fail */
} op;


/* ---- params checks ---- */

static int g_index; /* the op being checked, for messages */

__attribute__((noreturn, format(printf, 1, 2))) static void invalid(const char *fmt, ...) {
    sf_buf b = SF_BUF_INIT;
    va_list ap;
    sf_buf_printf(&b, "params.ops[%d]", g_index);
    va_start(ap, fmt);
    sf_buf_vprintf(&b, fmt, ap);
    va_end(ap);
    sf_fail(sf_buf_cstr(&b));
}

/* The value of key as an integer in [min, max]; def if absent. */
static long long get_int(const char *obj, const char *key, long long min, long long max,
                         long long def, const char *where) {
    if (!sf_json_raw(obj, key, NULL)) return def;
    long long v = sf_json_int(obj, key, 0);
    if (v != sf_json_int(obj, key, 1) || v < min || v > max) {
        if (max == LLONG_MAX && min == 0) invalid("%s.%s must be a non-negative integer", where, key);
        if (max == LLONG_MAX) invalid("%s.%s must be an integer", where, key);
        invalid("%s.%s must be an integer from %lld to %lld", where, key, min, max);
    }
    return v;
}

static int get_bool(const char *obj, const char *key) {
    if (!sf_json_raw(obj, key, NULL)) return 0;
    int v = sf_json_bool(obj, key, -1);
    if (v < 0) invalid(".%s must be true or false", key);
    return v;
}

/* Copies the string value of key (1 to NAME_BYTES bytes, no NUL) into buf; 0 if absent. */
static int get_name(const char *obj, const char *key, char *buf) {
    if (!sf_json_raw(obj, key, NULL)) return 0;
    long n = sf_json_str(obj, key, buf, NAME_BYTES + 1);
    if (n < 1 || n > NAME_BYTES || strlen(buf) != (size_t)n)
        invalid(".%s must be a string of 1 to %d bytes", key, NAME_BYTES);
    return 1;
}

/* Checks that the value of key, if present, is a JSON string; returns whether it is present. */
static int check_str(const char *obj, const char *key) {
    if (!sf_json_raw(obj, key, NULL)) return 0;
    if (sf_json_str(obj, key, NULL, 0) < 0) invalid(".%s must be a string", key);
    return 1;
}

/* Checks that obj has only the fields listed in fields (" a b c "). */
static void check_fields(const char *obj, const char *fields, const char *where) {
    sf_json_iter it;
    char key[NAME_BYTES + 1], pattern[40];
    int r;
    sf_json_object_begin(&it, obj);
    while ((r = sf_json_object_next(&it, key, sizeof key, NULL, NULL)) > 0) {
        size_t n = strlen(key);
        int known = n > 0 && n + 3 <= sizeof pattern;
        if (known) {
            pattern[0] = ' ';
            memcpy(pattern + 1, key, n);
            pattern[n + 1] = ' ';
            pattern[n + 2] = '\0';
            known = strstr(fields, pattern) != NULL;
        }
        if (!known) {
            sf_buf msg = SF_BUF_INIT;
            sf_buf_json_str(&msg, key);
            invalid("%s has an unknown field %s", where, sf_buf_cstr(&msg));
        }
    }
    if (r < 0) invalid("%s is not a well-formed JSON object", where);
}

static void parse_retries(const char *obj, sf_step_config *config) {
    char backoff[16];
    const char *r = sf_json_raw(obj, "retries", NULL);
    if (!r) return;
    if (*r != '{') invalid(".retries must be an object");
    check_fields(r, " limit delay_ms backoff ", ".retries");
    config->retries_limit = (int32_t)get_int(r, "limit", 0, INT32_MAX, SF_DEFAULT, ".retries");
    config->retry_delay_ms = get_int(r, "delay_ms", 0, LLONG_MAX, SF_DEFAULT, ".retries");
    if (sf_json_raw(r, "backoff", NULL)) {
        long n = sf_json_str(r, "backoff", backoff, sizeof backoff);
        if (n >= 0 && (size_t)n < sizeof backoff && strcmp(backoff, "constant") == 0)
            config->backoff = SF_BACKOFF_CONSTANT;
        else if (n >= 0 && (size_t)n < sizeof backoff && strcmp(backoff, "linear") == 0)
            config->backoff = SF_BACKOFF_LINEAR;
        else if (n >= 0 && (size_t)n < sizeof backoff && strcmp(backoff, "exponential") == 0)
            config->backoff = SF_BACKOFF_EXPONENTIAL;
        else
            invalid(".retries.backoff must be \"constant\", \"linear\" or \"exponential\"");
    }
}

static void parse_op(op *o, const char *text, size_t len) {
    char kind[16];
    memset(o, 0, sizeof *o);
    o->text = (char *)malloc(len + 1);
    if (!o->text) __builtin_trap();
    memcpy(o->text, text, len);
    o->text[len] = '\0';
    if (*o->text != '{') invalid(" must be an object");
    long n = sf_json_str(o->text, "op", kind, sizeof kind);
    o->kind = -1;
    for (int k = 0; n > 0 && (size_t)n < sizeof kind && k <= OP_HTTP; k++)
        if (strcmp(kind, OP_NAMES[k]) == 0) o->kind = k;
    if (o->kind < 0)
        invalid(".op must be one of do, sleep, sleep_until, wait, now, random, fail, http");
    check_fields(o->text, OP_FIELDS[o->kind], "");
    if (!get_name(o->text, "name", o->name) && o->kind != OP_FAIL) invalid(".name is required");

    const char *t = o->text;
    switch (o->kind) {
    case OP_DO:
        o->config = (sf_step_config)SF_STEP_CONFIG_DEFAULT;
        get_int(t, "fail_times", 0, INT32_MAX, 0, "");
        get_bool(t, "non_retryable");
        get_bool(t, "spin");
        get_bool(t, "now_inside");
        parse_retries(t, &o->config);
        o->config.timeout_ms = get_int(t, "timeout_ms", 0, LLONG_MAX, SF_DEFAULT, "");
        o->config.sensitive = get_bool(t, "sensitive");
        o->rollback = get_bool(t, "rollback");
        o->rollback_fails = get_bool(t, "rollback_fails");
        if (o->rollback_fails && !o->rollback) invalid(".rollback_fails needs \"rollback\":true");
        o->propagate = get_bool(t, "propagate");
        break;
    case OP_SLEEP:
        if (!sf_json_raw(t, "ms", NULL)) invalid(".ms is required");
        o->ms = get_int(t, "ms", LLONG_MIN, LLONG_MAX, 0, "");
        break;
    case OP_SLEEP_UNTIL:
        if (!sf_json_raw(t, "at_ms", NULL)) invalid(".at_ms is required");
        o->ms = get_int(t, "at_ms", LLONG_MIN, LLONG_MAX, 0, "");
        break;
    case OP_WAIT:
        if (!get_name(t, "type", o->type)) invalid(".type is required");
        o->timeout_ms = get_int(t, "timeout_ms", 0, LLONG_MAX, -1, "");
        o->propagate = get_bool(t, "propagate");
        break;
    case OP_RANDOM:
        o->bytes = get_int(t, "bytes", 1, RANDOM_BYTES, 8, "");
        break;
    case OP_FAIL: {
        long m = sf_json_raw(t, "message", NULL) ? sf_json_str(t, "message", NULL, 0) : -1;
        if (m < 0) invalid(".message must be a string");
        o->message = (char *)malloc((size_t)m + 1);
        if (!o->message) __builtin_trap();
        sf_json_str(t, "message", o->message, (size_t)m + 1);
        break;
    }
    case OP_HTTP: {
        sf_json_iter it;
        const char *v;
        int r;
        check_str(t, "method");
        if (!check_str(t, "url")) invalid(".url is required");
        check_str(t, "body");
        const char *h = sf_json_raw(t, "headers", NULL);
        if (h) {
            if (!sf_json_object_begin(&it, h)) invalid(".headers must be an object of strings");
            while ((r = sf_json_object_next(&it, NULL, 0, &v, NULL)) > 0)
                if (*v != '"') invalid(".headers must be an object of strings");
            if (r < 0) invalid(".headers must be an object of strings");
        }
        get_int(t, "repeat", 1, HTTP_REPEAT_MAX, 1, "");
        get_bool(t, "with_headers");
        o->config = (sf_step_config)SF_STEP_CONFIG_DEFAULT;
        o->config.timeout_ms = get_int(t, "timeout_ms", 0, LLONG_MAX, SF_DEFAULT, "");
        break;
    }
    default:
        break;
    }
}

/* ---- step and rollback functions ---- */

/* Busy loop that never ends: only the step timeout or the CPU limit stops it. The volatile
 * counter keeps the compiler from treating the loop as side-effect free. */
__attribute__((noinline, noreturn)) static void spin_forever(void) {
    volatile uint32_t n = 0;
    for (;;) n = n + 1;
}

static void put_hex(sf_buf *out, const unsigned char *p, size_t n) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        char h[2] = {hex[p[i] >> 4], hex[p[i] & 15]};
        sf_buf_append(out, h, 2);
    }
}

/* input: the op. Fails attempts 1..fail_times ("spin": spins in them instead; with
 * fail_times 0, in every attempt). result: {"step":N,"attempt":A} (+ "now", "random" with
 * now_inside: values read inside the step, which are not recorded). */
static int do_step(const char *input, sf_buf *out) {
    char name[NAME_BYTES + 1];
    long long fail_times = sf_json_int(input, "fail_times", 0);
    int32_t attempt = sf_attempt();
    sf_json_str(input, "name", name, sizeof name);
    if (sf_json_bool(input, "spin", 0) && (fail_times == 0 || attempt <= fail_times)) spin_forever();
    if (attempt <= fail_times) {
        sf_buf_printf(out, "attempt %ld failed", (long)attempt);
        return sf_json_bool(input, "non_retryable", 0) ? SF_ERROR_NO_RETRY : SF_ERROR;
    }
    sf_buf_puts(out, "{\"step\":");
    sf_buf_json_str(out, name);
    sf_buf_printf(out, ",\"attempt\":%ld", (long)attempt);
    if (sf_json_bool(input, "now_inside", 0)) {
        unsigned char r[4];
        sf_buf_printf(out, ",\"now\":%lld,\"random\":\"", (long long)sf_now());
        sf_random(r, sizeof r);
        put_hex(out, r, sizeof r);
        sf_buf_puts(out, "\"");
    }
    sf_buf_puts(out, "}");
    return SF_OK;
}

/* Rollbacks. input: the step's recorded result {"step":N,...}. */
static int undo(const char *input, sf_buf *out) {
    char name[NAME_BYTES + 1];
    sf_json_str(input, "step", name, sizeof name);
    sf_buf_puts(out, "{\"undone\":");
    sf_buf_json_str(out, name);
    sf_buf_puts(out, "}");
    return SF_OK;
}

static int undo_fails(const char *input, sf_buf *out) {
    char name[NAME_BYTES + 1];
    sf_json_str(input, "step", name, sizeof name);
    sf_buf_printf(out, "cannot undo %s", name);
    return SF_ERROR_NO_RETRY;
}

/* The string value of key as a new string; NULL if absent or not a string. */
static char *dup_str(const char *obj, const char *key) {
    long n = sf_json_str(obj, key, NULL, 0);
    if (n < 0) return NULL;
    char *s = (char *)malloc((size_t)n + 1);
    if (!s) __builtin_trap();
    sf_json_str(obj, key, s, (size_t)n + 1);
    return s;
}

/* input: the http op. Makes the call `repeat` times (to exercise the host's per-step limit)
 * and records the last answer: {"status":S,"body":B} (+ "headers" with with_headers), or
 * {"error":msg}. */
static int http_step(const char *input, sf_buf *out) {
    char *method = dup_str(input, "method"), *url = dup_str(input, "url");
    char *body = dup_str(input, "body");
    const char *headers = sf_json_raw(input, "headers", NULL); /* sf_http reads the object only */
    long long repeat = sf_json_int(input, "repeat", 1);
    sf_buf answer = SF_BUF_INIT;
    int status = -1;
    for (long long i = 0; i < repeat; i++) {
        sf_buf_reset(&answer);
        status = sf_http(method ? method : "GET", url, headers, body, &answer);
    }
    if (status < 0) {
        sf_buf_puts(out, "{\"error\":");
        sf_buf_json_str(out, sf_last_error());
        sf_buf_puts(out, "}");
        return SF_OK;
    }
    size_t len;
    const char *raw = sf_json_raw(sf_buf_cstr(&answer), "body", &len);
    sf_buf_printf(out, "{\"status\":%d,\"body\":", status);
    if (raw) sf_buf_append(out, raw, len);
    else sf_buf_puts(out, "\"\"");
    if (sf_json_bool(input, "with_headers", 0)) {
        raw = sf_json_raw(sf_buf_cstr(&answer), "headers", &len);
        sf_buf_puts(out, ",\"headers\":");
        if (raw) sf_buf_append(out, raw, len);
        else sf_buf_puts(out, "{}");
    }
    sf_buf_puts(out, "}");
    return SF_OK;
}

/* ---- the workflow ---- */

/* Runs one op; appends its output value to out (fail ops never return). */
static void run_op(const op *o, sf_buf *out) {
    switch (o->kind) {
    case OP_DO: {
        sf_step_config config = o->config;
        if (o->rollback) config.rollback = o->rollback_fails ? undo_fails : undo;
        const char *r = step_do_with(o->name, do_step, o->text, &config);
        if (r) {
            sf_buf_puts(out, r);
        } else if (o->propagate) {
            sf_failf("step %s failed: %s", o->name, sf_last_error());
        } else {
            sf_buf_puts(out, "{\"error\":");
            sf_buf_json_str(out, sf_last_error());
            sf_buf_puts(out, "}");
        }
        break;
    }
    case OP_SLEEP:
        step_sleep(o->name, o->ms);
        sf_buf_puts(out, "true");
        break;
    case OP_SLEEP_UNTIL:
        step_sleep_until(o->name, o->ms);
        sf_buf_puts(out, "true");
        break;
    case OP_WAIT: {
        const char *payload = step_wait_for_event(o->name, o->type, o->timeout_ms);
        if (payload) {
            sf_buf_puts(out, payload);
        } else if (o->propagate) {
            sf_failf("wait %s timed out", o->name);
        } else {
            sf_buf_puts(out, "{\"timeout\":");
            sf_buf_json_str(out, sf_last_error());
            sf_buf_puts(out, "}");
        }
        break;
    }
    case OP_NOW:
        sf_buf_printf(out, "%lld", (long long)sf_now());
        break;
    case OP_RANDOM: {
        unsigned char r[RANDOM_BYTES];
        sf_random(r, (size_t)o->bytes);
        sf_buf_puts(out, "\"");
        put_hex(out, r, (size_t)o->bytes);
        sf_buf_puts(out, "\"");
        break;
    }
    case OP_FAIL:
        sf_fail(o->message);
    case OP_HTTP: {
        const char *r = step_do_with(o->name, http_step, o->text, &o->config);
        if (r) {
            sf_buf_puts(out, r);
        } else {
            sf_buf_puts(out, "{\"error\":");
            sf_buf_json_str(out, sf_last_error());
            sf_buf_puts(out, "}");
        }
        break;
    }
    default:
        break;
    }
}

const char *sf_workflow(const char *params) {
    sf_json_iter it;
    const char *text;
    size_t len, count = 0, cap = 0;
    op *ops = NULL;
    int r;

    const char *list = sf_json_raw(params, "ops", NULL);
    if (!list || !sf_json_array_begin(&it, list))
        return sf_fail("params must be an object with an array \"ops\"");
    {
        sf_json_iter top;
        char key[NAME_BYTES + 1];
        sf_json_object_begin(&top, params);
        while (sf_json_object_next(&top, key, sizeof key, NULL, NULL) > 0) {
            if (strcmp(key, "ops") != 0) {
                sf_buf msg = SF_BUF_INIT;
                sf_buf_json_str(&msg, key);
                return sf_failf("params has an unknown field %s", sf_buf_cstr(&msg));
            }
        }
    }
    while ((r = sf_json_array_next(&it, &text, &len)) > 0) {
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            ops = (op *)realloc(ops, cap * sizeof *ops);
            if (!ops) __builtin_trap();
        }
        g_index = (int)count;
        parse_op(&ops[count], text, len);
        for (size_t j = 0; j < count; j++)
            if (ops[count].name[0] && strcmp(ops[j].name, ops[count].name) == 0)
                invalid(".name \"%s\" is already used by params.ops[%d]", ops[count].name, (int)j);
        count++;
    }
    if (r < 0) return sf_fail("params.ops is not a well-formed JSON array");

    sf_buf out = SF_BUF_INIT;
    sf_buf_puts(&out, "{");
    for (size_t i = 0; i < count; i++) {
        if (i) sf_buf_puts(&out, ",");
        sf_buf_json_str(&out, ops[i].name);
        sf_buf_puts(&out, ":");
        run_op(&ops[i], &out);
    }
    sf_buf_puts(&out, "}");
    return sf_buf_cstr(&out);
}
