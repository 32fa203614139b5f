/*
 * stepfleet.h - single-header C SDK for stepfleet guest modules (guest ABI version 2).
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
 * every primitive (step_do, step_sleep, step_wait_for_event, sf_now, sf_random) is answered
 * inside the guest from the journal while there is a recorded entry for it; the first one that
 * is not recorded does its work and reports it to the host, which then stops the guest
 * (sf_now and sf_random record their value and let the run go on). Returning from sf_workflow
 * completes the instance.
 *
 * The workflow must be deterministic in *which* primitives it asks for, given the journal; work
 * that is not deterministic belongs inside a step function, whose result is recorded, or goes
 * through sf_now / sf_random.
 *
 * Step functions may call the outside world with sf_http, through the host's egress gateway
 * (allow-listed hosts only; secrets are added by the host and never seen by the guest).
 *
 * Compensations (sagas): a step may register a rollback function in its sf_step_config. When
 * the instance fails (or an operator terminates it asking for rollback) the host replays the
 * program in compensate mode; the SDK then runs the rollbacks of the completed steps, one per
 * run, newest first, each called with its step's recorded result. The program itself needs
 * no extra code for this: it is replayed unchanged, and the SDK takes over when it reaches the
 * end of what was recorded (or the first recorded compensation), whatever primitive the
 * program is calling there; sf_fail and returning from sf_workflow hand over at once. The
 * rollbacks are taken from the configs the program passes on replay, so pass the same config
 * on every run. A rollback is begun with its step's config (retries, timeout), and its result
 * counts as sensitive when the step's does. Recorded compensations that do not match the
 * registered rollbacks, newest first, report nondeterminism (op 6) under the name of the
 * rollback expected there, or "(none)" when the journal holds more compensations than that.
 *
 * The implementation is compiled into the file that includes this header. A program split over
 * several .c files defines STEPFLEET_DECLARATIONS_ONLY before the include in all files but one.
 *
 * Memory handed out by the SDK (step results, event payloads, instance id, sf_buf contents) is
 * never freed by the SDK: a module instance lives for one run only. Running out of memory
 * traps, so the host reports the memory limit instead of the workflow failing for good.
 *
 * The module imports nothing outside the stepfleet module unless STEPFLEET_LIBC_PRINTF is
 * defined (see sf_buf_printf).
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
#define SF_ABI_VERSION 2

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
 * Returns SF_OK, SF_ERROR or SF_ERROR_NO_RETRY (any other non-zero value counts as SF_ERROR).
 * Rollback (compensation) functions have the same type; their input is the step's recorded
 * result. A step function may call sf_now, sf_random, sf_attempt, sf_log and the sf_buf /
 * sf_json helpers; any other primitive fails the step for good (see step_do). */
typedef int (*sf_step_fn)(const char *input, sf_buf *out);

/* Retry backoff of a step (sf_step_config.backoff), for retry n = 1, 2, ...:
 * constant: delay; linear: delay * n; exponential: delay * 2^(n-1) (capped by the host). */
#define SF_BACKOFF_DEFAULT 0     /* the host default (exponential) */
#define SF_BACKOFF_CONSTANT 1
#define SF_BACKOFF_LINEAR 2
#define SF_BACKOFF_EXPONENTIAL 3

/* "Use the host default" for the numeric fields of sf_step_config (any negative value works). */
#define SF_DEFAULT (-1)

/* How a step runs. Start from SF_STEP_CONFIG_DEFAULT and set what you need:
 *
 *   sf_step_config cfg = SF_STEP_CONFIG_DEFAULT;
 *   cfg.retries_limit = 3;
 *   cfg.rollback = release;
 *
 * Fields left at their default are omitted from the config the host receives (so the host's
 * documented defaults apply); the host checks the ranges and fails the run on a value out of
 * range (it never clamps). */
typedef struct sf_step_config {
    int32_t retries_limit;  /* retries after the first attempt, 0 to 1000; < 0: default (5) */
    int64_t retry_delay_ms; /* base retry delay in ms; < 0: default (10000) */
    int backoff;            /* SF_BACKOFF_*; SF_BACKOFF_DEFAULT: default (exponential) */
    int64_t timeout_ms;     /* wall-clock limit of each attempt in ms; < 0: default (600000) */
    sf_step_fn rollback;    /* compensation, called with the step's recorded result; NULL: none */
    int sensitive;          /* non-zero: the result is shown as <redacted> in status and logs */
} sf_step_config;

#define SF_STEP_CONFIG_DEFAULT {SF_DEFAULT, SF_DEFAULT, SF_BACKOFF_DEFAULT, SF_DEFAULT, NULL, 0}

/* ---- Provided by the tenant ------------------------------------------------------------ */

/* The workflow. params is the instance's params (JSON text). Return the output (JSON text) to
 * complete the instance, or end with `return sf_fail(msg);` to fail it. Returning NULL without
 * calling sf_fail fails the instance with "sf_workflow returned NULL". */
const char *sf_workflow(const char *params);

/* ---- Workflow API ------------------------------------------------------------------------ */

/* Runs step `name` at the current journal position with the default config (no rollback, not
 * sensitive, host-default retries and timeout). Same as step_do_with(name, fn, input, NULL). */
const char *step_do(const char *name, sf_step_fn fn, const char *input);

/* Runs step `name` at the current journal position with `config` (NULL: all defaults).
 * Recorded success: returns the recorded result (NUL-terminated JSON) without running fn.
 * Recorded failure (the last attempt failed, or a non-retryable error): returns NULL;
 * sf_last_error() gives the recorded message.
 * Not recorded yet: tells the host the step begins (step_begin, which returns the attempt
 * number, see sf_attempt), runs fn(input, out) and reports the outcome to the host; never
 * returns. The host retries failed attempts by running the program again later.
 * A recorded entry with another name or of another kind reports nondeterminism; never returns.
 * name must be 1 to 256 bytes of UTF-8 (the host checks). input may be NULL (fn then sees "").
 * An unknown config->backoff fails the instance. Called from inside a step function, it fails
 * the running step for good (non-retryable) instead. */
const char *step_do_with(const char *name, sf_step_fn fn, const char *input,
                         const sf_step_config *config);

/* The attempt number (1 = first) of the step or rollback function now running, as the host
 * returned it from step_begin; 0 when no step function is running. */
int32_t sf_attempt(void);

/* Durable sleep `name` for duration_ms milliseconds (a negative duration counts as 0).
 * Recorded: returns at once. Not recorded yet: reports the sleep to the host, which stops the
 * run and continues the program after the timer fires; never returns. Durations over the
 * host's limit fail the instance. Nondeterminism as for step_do. */
void step_sleep(const char *name, int64_t duration_ms);

/* Durable sleep `name` until unix_ms (milliseconds since the Unix epoch); a time in the past
 * continues at once (after one host round trip). Otherwise like step_sleep. */
void step_sleep_until(const char *name, int64_t unix_ms);

/* Waits (durably) under the name `name` for an event of `type` (1 to 256 bytes) sent to this
 * instance. timeout_ms < 0 uses the host default (24 hours).
 * Recorded event: returns its payload (NUL-terminated JSON); sf_last_error() is then "".
 * Recorded timeout: returns NULL; sf_last_error() holds the timeout message.
 * Not recorded yet: reports the wait to the host, which stops the run; never returns. */
const char *step_wait_for_event(const char *name, const char *type, int64_t timeout_ms);

/* The current time in milliseconds since the Unix epoch. In workflow code the value is
 * recorded in the journal (a journal position of its own) and replayed; inside a step or
 * rollback function it comes from the host each time and is not recorded. A journal entry of
 * another kind at this position reports nondeterminism (op 4, under the name "now", since the
 * primitive has none). */
int64_t sf_now(void);

/* Fills buf with len random bytes, recorded like sf_now (one journal entry per 256 bytes, so
 * keep the length the same from run to run). len 0 does nothing. A journal entry of another
 * kind or length reports nondeterminism (op 5, under the name "random"). */
void sf_random(void *buf, size_t len);

/* An HTTP call through the host's egress gateway; only inside a step or rollback function (the
 * step's result is what gets recorded, so the call is never repeated on replay). Called from
 * workflow code it fails the instance.
 *
 * method: "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE" or "OPTIONS" (NULL: "GET").
 * url: http or https; its host must be on the tenant's egress allow list, exactly as written.
 * headers_json: a JSON object of string values, e.g. {"Accept":"application/json"}, or NULL.
 *   A secret the operator configured for the host is added by the gateway (replacing a header
 *   of the same name) and never visible to the guest: it is scrubbed from the answer.
 * body: request body text, sent as UTF-8 (NULL: none).
 *
 * Returns the HTTP status (a 3xx included: redirects are not followed) and appends the whole
 * response JSON {"status":S,"headers":{...},"body":"text"} to *response (header names in
 * lower case; read the body with sf_json_str(response->data, "body", ...)). On failure
 * (refused by the allow list, timed out, connection failed, over the per-step call limit,
 * egress not configured, headers_json not an object of strings) returns -1, leaves *response
 * unchanged and sets sf_last_error() to the message. See docs/guest-abi.md, "Calling the
 * outside world". */
int sf_http(const char *method, const char *url, const char *headers_json, const char *body,
            sf_buf *response);

/* Message of the last step_do / step_wait_for_event answered as failed / timed out, or of the
 * last sf_http that returned -1; "" after one answered with a result. The string stays valid
 * for the whole run. */
const char *sf_last_error(void);

/* Fails the instance for good with msg (NULL means "workflow failed"); never returns.
 * Declared to return a string so a workflow can write `return sf_fail(msg);`. The host then
 * runs the compensations of completed steps, if any registered one.
 * Called inside a step or rollback function it fails that step for good instead (as if the
 * function had returned SF_ERROR_NO_RETRY with msg); the program then decides. */
__attribute__((noreturn)) const char *sf_fail(const char *msg);

/* Like sf_fail with a printf-style message. */
__attribute__((noreturn, format(printf, 1, 2))) const char *sf_failf(const char *fmt, ...);

/* Sends a log line at `level` (SF_LOG_*) to the host, formatted like sf_buf_printf. The host
 * bounds lines per run and their length. Lines logged by replayed workflow code repeat on every
 * run; log from inside step functions to log once per attempt. */
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

/* ---- Minimal JSON readers ------------------------------------------------------------------
 * The key readers look at the top-level keys of the object at the start of json (leading
 * whitespace allowed; first occurrence of a key wins) and read no further than that object,
 * so json may also point at a value inside larger text, such as an element found by
 * sf_json_array_next or a value found by sf_json_raw. They are lenient readers for trusted
 * input, not validators: text after the object is not looked at. */

/* The integer value of `key`, or def if json is not an object, the key is missing, or its value
 * is not a JSON integer that fits in a long long (fractions and exponents count as not). */
long long sf_json_int(const char *json, const char *key, long long def);

/* Copies the unescaped string value of `key` into buf (NUL-terminated, truncated to buflen-1
 * bytes like snprintf, which may cut a multi-byte character). Returns the full unescaped length, or -1 if json is not an object, the
 * key is missing, or its value is not a well-formed JSON string (buf is then set to ""). */
long sf_json_str(const char *json, const char *key, char *buf, size_t buflen);

/* 1 or 0 for a value of `key` that is true or false; def otherwise (missing, not a boolean). */
int sf_json_bool(const char *json, const char *key, int def);

/* The raw JSON text of the value of `key` (not NUL-terminated at its end: *len gives its
 * length in bytes), pointing into json; NULL (and *len 0) if json is not an object, the key is
 * missing or the value is malformed. len may be NULL. The first byte tells the type:
 * '{' object, '[' array, '"' string, 't'/'f' boolean, 'n' null, otherwise a number. */
const char *sf_json_raw(const char *json, const char *key, size_t *len);

/* Iterator over the elements of a JSON array or the members of a JSON object. */
typedef struct sf_json_iter {
    const char *p; /* next element or member, or where the walk stopped */
    int state;     /* 0 walking, 1 done, -1 malformed */
} sf_json_iter;

/* Starts walking the array at the start of json (leading whitespace allowed). Returns 1, or 0
 * if json does not start with '['. */
int sf_json_array_begin(sf_json_iter *it, const char *json);

/* The next element: returns 1 and points *elem at its raw JSON text (*len bytes, within the
 * array's text; elem and len may be NULL); 0 after the last element; -1 if the array is
 * malformed (then always -1). */
int sf_json_array_next(sf_json_iter *it, const char **elem, size_t *len);

/* Starts walking the members of the object at the start of json. Returns 1, or 0 if json does
 * not start with '{'. */
int sf_json_object_begin(sf_json_iter *it, const char *json);

/* The next member: returns 1, copies its unescaped key into key (NUL-terminated, truncated to
 * keylen-1 bytes like sf_json_str: a key of keylen-1 bytes may have been cut) and points
 * *value at the member's raw JSON value (*len bytes; value and len may be NULL); 0 after the
 * last member; -1 if the object is malformed (then always -1). */
int sf_json_object_next(sf_json_iter *it, char *key, size_t keylen, const char **value,
                        size_t *len);

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

SF__IMPORT("step_begin")
int32_t sf__host_step_begin(int32_t seq, const char *name, int32_t name_len, const char *config,
                            int32_t config_len);
SF__IMPORT("step_done")
void sf__host_step_done(int32_t seq, const char *name, int32_t name_len, const char *result,
                        int32_t result_len, int32_t flags);
SF__IMPORT("step_failed")
void sf__host_step_failed(int32_t seq, const char *name, int32_t name_len, const char *msg,
                          int32_t msg_len, int32_t flags);
SF__IMPORT("sleep")
void sf__host_sleep(int32_t seq, const char *name, int32_t name_len, int64_t ms, int32_t flags);
SF__IMPORT("wait_event")
void sf__host_wait_event(int32_t seq, const char *name, int32_t name_len, const char *type,
                         int32_t type_len, int64_t timeout_ms);
SF__IMPORT("now")
int64_t sf__host_now(int32_t seq);
SF__IMPORT("random")
void sf__host_random(int32_t seq, void *ptr, int32_t len);
SF__IMPORT("complete")
void sf__host_complete(int32_t seq, const char *output, int32_t output_len);
SF__IMPORT("fail")
void sf__host_fail(int32_t seq, const char *msg, int32_t msg_len);
SF__IMPORT("nondeterminism")
void sf__host_nondeterminism(int32_t seq, int32_t op, const char *name, int32_t name_len);
SF__IMPORT("log")
void sf__host_log(int32_t level, const char *msg, int32_t msg_len);
/* Imported only by modules that call sf_http (the linker drops unused imports). */
SF__IMPORT("http_request")
int32_t sf__host_http_request(const char *request, int32_t request_len);
SF__IMPORT("http_response")
void sf__host_http_response(char *ptr, int32_t len);

/* nondeterminism ops */
#define SF__OP_STEP 1
#define SF__OP_SLEEP 2
#define SF__OP_WAIT 3
#define SF__OP_NOW 4
#define SF__OP_RANDOM 5
#define SF__OP_COMPENSATION 6

/* journal entry kinds */
#define SF__KIND_STEP_OK 1
#define SF__KIND_STEP_FAILED 2
#define SF__KIND_SLEEP 3
#define SF__KIND_EVENT 4
#define SF__KIND_WAIT_TIMEOUT 5
#define SF__KIND_NOW 6
#define SF__KIND_RANDOM 7
#define SF__KIND_COMPENSATED 8

/* step_done / step_failed / sleep flags */
#define SF__DONE_HAS_ROLLBACK 1
#define SF__DONE_SENSITIVE 2
#define SF__DONE_COMPENSATION 4
#define SF__FAILED_NO_RETRY 1
#define SF__SLEEP_UNTIL 1

#define SF__MODE_FORWARD 0
#define SF__MODE_COMPENSATE 1

#define SF__RANDOM_MAX 256 /* bytes per random call */

/* A replayed step that registered a rollback (compensate mode only). */
typedef struct sf__undo {
    const char *name;
    const char *result;    /* the step's recorded result: the rollback's input */
    sf_step_config config; /* for step_begin and the flags */
} sf__undo;

/* Replay state for the current run. The buffer is read in place, entry by entry, so an entry
 * kind from a future ABI is only an error when the program actually reaches it. */
static struct {
    const unsigned char *cur, *end; /* unread part of the replay buffer */
    uint32_t entries_left;          /* journal entries not replayed yet */
    int32_t seq;                    /* journal position reached */
    uint32_t mode;                  /* SF__MODE_* */
    const char *instance_id;
    const char *last_error;
    int in_step;                    /* a step or rollback function is running */
    const char *step_name;          /* ... under this name */
    int32_t attempt;                /* ... as this attempt (from step_begin) */
    sf__undo *undo;                 /* compensate mode: replayed steps with a rollback, in order */
    size_t undo_len, undo_cap;
} sf__st;

/* A terminal import returned: the host broke the contract, so stop here rather than continue. */
#define SF__AFTER_TERMINAL() __builtin_trap()

static int32_t sf__len32(size_t n) { return n > INT32_MAX ? INT32_MAX : (int32_t)n; }

static void sf__log_raw(int level, const char *msg) {
    sf__host_log(level, msg, sf__len32(strlen(msg)));
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
    if (n == SIZE_MAX) sf__oom();
    char *p = (char *)sf__xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* ---- replay buffer ---- */

static uint32_t sf__read_u32(const unsigned char **p) {
    if ((size_t)(sf__st.end - *p) < 4) sf__corrupt("stepfleet: replay buffer truncated");
    const unsigned char *q = *p;
    *p += 4;
    return (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
}

static const char *sf__read_bytes(const unsigned char **p, uint32_t *len) {
    *len = sf__read_u32(p);
    if ((size_t)(sf__st.end - *p) < *len) sf__corrupt("stepfleet: replay buffer truncated");
    const char *s = (const char *)*p;
    *p += *len;
    return s;
}

/* One journal entry, read in place. */
typedef struct sf__entry {
    unsigned kind;
    const char *name, *value;
    uint32_t name_len, value_len;
    const unsigned char *next; /* the entry after it */
} sf__entry;

/* Reads the entry at the current journal position without consuming it; 0 at the end. */
static int sf__peek(sf__entry *e) {
    if (sf__st.entries_left == 0) return 0;
    const unsigned char *p = sf__st.cur;
    if (p >= sf__st.end) sf__corrupt("stepfleet: replay buffer truncated");
    e->kind = *p++;
    e->name = sf__read_bytes(&p, &e->name_len);
    e->value = sf__read_bytes(&p, &e->value_len);
    e->next = p;
    return 1;
}

static void sf__consume(const sf__entry *e) {
    sf__st.cur = e->next;
    sf__st.entries_left--;
    sf__st.seq++;
}

static int sf__name_is(const sf__entry *e, const char *name) {
    size_t n = strlen(name);
    return e->name_len == n && memcmp(e->name, name, n) == 0;
}

/* ---- reporting ---- */

__attribute__((noreturn)) static void sf__nondeterminism(int32_t op, const char *name) {
    sf__host_nondeterminism(sf__st.seq, op, name, sf__len32(strlen(name)));
    SF__AFTER_TERMINAL();
}

/* Fails the step (or rollback) function now running, at the step's seq. */
__attribute__((noreturn)) static void sf__step_failed(const char *msg, int32_t flags) {
    const char *name = sf__st.step_name;
    sf__host_step_failed(sf__st.seq, name, sf__len32(strlen(name)), msg, sf__len32(strlen(msg)),
                         flags);
    SF__AFTER_TERMINAL();
}

/* A step function called a primitive it must not call: the step fails for good. */
__attribute__((noreturn)) static void sf__misuse(const char *what) {
    sf_buf b = SF_BUF_INIT;
    sf_buf_printf(&b, "%s called inside step function '%s'", what, sf__st.step_name);
    sf__step_failed(sf_buf_cstr(&b), SF__FAILED_NO_RETRY);
}

/* The step_begin config JSON; empty when every field is at its default. */
static void sf__config_json(sf_buf *b, const sf_step_config *c) {
    static const char *const backoff[] = {"", "constant", "linear", "exponential"};
    const char *sep = "";
    if (!c) return;
    if (c->retries_limit >= 0 || c->retry_delay_ms >= 0 || c->backoff != SF_BACKOFF_DEFAULT) {
        sf_buf_puts(b, "{\"retries\":{");
        if (c->retries_limit >= 0) sf_buf_printf(b, "\"limit\":%ld", (long)c->retries_limit), sep = ",";
        if (c->retry_delay_ms >= 0)
            sf_buf_printf(b, "%s\"delay_ms\":%lld", sep, (long long)c->retry_delay_ms), sep = ",";
        if (c->backoff != SF_BACKOFF_DEFAULT)
            sf_buf_printf(b, "%s\"backoff\":\"%s\"", sep, backoff[c->backoff]);
        sf_buf_puts(b, "}");
        sep = ",";
    }
    if (c->timeout_ms >= 0)
        sf_buf_printf(b, "%s\"timeout_ms\":%lld", b->len ? sep : "{", (long long)c->timeout_ms);
    if (b->len) sf_buf_puts(b, "}");
}

/* Begins a new step (or, with compensation set, the rollback of one) at seq, runs fn as the
 * attempt the host names and reports the outcome. */
__attribute__((noreturn)) static void sf__run_new_step(const char *name, sf_step_fn fn,
                                                       const char *input,
                                                       const sf_step_config *config,
                                                       int compensation) {
    sf_buf cfg = SF_BUF_INIT, out = SF_BUF_INIT;
    size_t name_len = strlen(name);
    sf__config_json(&cfg, config);
    int32_t attempt = sf__host_step_begin(sf__st.seq, name, sf__len32(name_len), sf_buf_cstr(&cfg),
                                          sf__len32(cfg.len));
    sf_buf_free(&cfg);
    sf__st.in_step = 1;
    sf__st.step_name = name;
    sf__st.attempt = attempt;
    int rc = SF_ERROR_NO_RETRY;
    if (fn) rc = fn(input ? input : "", &out);
    else sf_buf_printf(&out, "step '%s' has no step function", name);
    if (rc == SF_OK) {
        int32_t flags = 0;
        if (compensation) flags |= SF__DONE_COMPENSATION;
        else if (config && config->rollback) flags |= SF__DONE_HAS_ROLLBACK;
        if (config && config->sensitive) flags |= SF__DONE_SENSITIVE;
        const char *res = out.len ? out.data : "null";
        sf__host_step_done(sf__st.seq, name, sf__len32(name_len), res, sf__len32(strlen(res)), flags);
        SF__AFTER_TERMINAL();
    }
    sf__step_failed(out.len ? out.data : "step failed",
                    rc == SF_ERROR_NO_RETRY ? SF__FAILED_NO_RETRY : 0);
}

/* Compensate mode, at a kind-8 entry or the end of the journal: checks the compensations
 * recorded so far against the remembered steps (newest first), then runs the next one or, when
 * all have run, completes. */
__attribute__((noreturn)) static void sf__compensate(void) {
    size_t m = sf__st.undo_len, k = 0;
    sf__entry e;
    while (sf__peek(&e)) {
        const char *want = k < m ? sf__st.undo[m - 1 - k].name : NULL;
        if (e.kind != SF__KIND_COMPENSATED || !want || !sf__name_is(&e, want))
            sf__nondeterminism(SF__OP_COMPENSATION, want ? want : "(none)");
        sf__consume(&e);
        k++;
    }
    if (k == m) {
        sf__host_complete(sf__st.seq, "null", 4);
        SF__AFTER_TERMINAL();
    }
    const sf__undo *u = &sf__st.undo[m - 1 - k];
    sf__run_new_step(u->name, u->config.rollback, u->result, &u->config, 1);
}

/* Every primitive outside a step function starts here: in compensate mode the program stops
 * at the first kind-8 entry or at the end of the journal. */
static void sf__intercept(void) {
    sf__entry e;
    if (sf__st.mode == SF__MODE_COMPENSATE && (!sf__peek(&e) || e.kind == SF__KIND_COMPENSATED))
        sf__compensate();
}

static void sf__remember(const char *name, const char *result, size_t result_len,
                         const sf_step_config *config) {
    if (sf__st.undo_len == sf__st.undo_cap) {
        size_t cap = sf__st.undo_cap ? sf__st.undo_cap * 2 : 8;
        if (cap > SIZE_MAX / sizeof *sf__st.undo) sf__oom();
        sf__undo *p = (sf__undo *)realloc(sf__st.undo, cap * sizeof *p);
        if (!p) sf__oom();
        sf__st.undo = p;
        sf__st.undo_cap = cap;
    }
    sf__undo *u = &sf__st.undo[sf__st.undo_len++];
    u->name = sf__strndup(name, strlen(name));
    u->result = sf__strndup(result, result_len);
    u->config = *config;
}

/* ---- exports ---- */

SF__EXPORT("sf_abi_version") int32_t sf_abi_version(void) { return SF_ABI_VERSION; }

SF__EXPORT("sf_alloc") void *sf_alloc(int32_t len) {
    return len < 0 ? NULL : malloc(len ? (size_t)len : 1);
}

/* Forward mode: completes the instance with out. Compensate mode: see sf__compensate. */
__attribute__((noreturn)) static void sf__complete(const char *out) {
    if (sf__st.mode == SF__MODE_COMPENSATE) sf__compensate();
    sf__host_complete(sf__st.seq, out, sf__len32(strlen(out)));
    SF__AFTER_TERMINAL();
}

SF__EXPORT("sf_run") void sf_run(const unsigned char *ptr, int32_t len) {
    const unsigned char *p = ptr;
    uint32_t n;
    sf__st.cur = ptr;
    sf__st.end = ptr + (len < 0 ? 0 : len);
    if (sf__read_u32(&p) != SF_ABI_VERSION) sf__corrupt("stepfleet: replay buffer ABI version is not 2");
    sf__st.mode = sf__read_u32(&p);
    if (sf__st.mode != SF__MODE_FORWARD && sf__st.mode != SF__MODE_COMPENSATE)
        sf__corrupt("stepfleet: replay buffer has an unknown mode");
    (void)sf__read_u32(&p); /* attempt: step_begin returns it when a step function runs */
    const char *id = sf__read_bytes(&p, &n);
    sf__st.instance_id = sf__strndup(id, n);
    const char *params_raw = sf__read_bytes(&p, &n);
    const char *params = sf__strndup(params_raw, n);
    sf__st.entries_left = sf__read_u32(&p);
    sf__st.cur = p;
    sf__st.seq = 0;
    sf__st.last_error = "";

    const char *out = sf_workflow(params);
    if (!out) sf_fail("sf_workflow returned NULL");
    sf__complete(out);
}

/* ---- primitives ---- */

const char *step_do(const char *name, sf_step_fn fn, const char *input) {
    return step_do_with(name, fn, input, NULL);
}

const char *step_do_with(const char *name, sf_step_fn fn, const char *input,
                         const sf_step_config *config) {
    sf__entry e;
    if (!name) name = "";
    if (sf__st.in_step) sf__misuse("step_do");
    if (config && (config->backoff < SF_BACKOFF_DEFAULT || config->backoff > SF_BACKOFF_EXPONENTIAL))
        sf_failf("step '%s' has an unknown backoff (%d)", name, config->backoff);
    sf__intercept();
    if (!sf__peek(&e)) sf__run_new_step(name, fn, input, config, 0);
    if ((e.kind != SF__KIND_STEP_OK && e.kind != SF__KIND_STEP_FAILED) || !sf__name_is(&e, name))
        sf__nondeterminism(SF__OP_STEP, name);
    sf__consume(&e);
    if (e.kind == SF__KIND_STEP_FAILED) {
        sf__st.last_error = sf__strndup(e.value, e.value_len);
        return NULL;
    }
    sf__st.last_error = "";
    if (sf__st.mode == SF__MODE_COMPENSATE && config && config->rollback)
        sf__remember(name, e.value, e.value_len, config);
    return sf__strndup(e.value, e.value_len);
}

int32_t sf_attempt(void) { return sf__st.in_step ? sf__st.attempt : 0; }

static void sf__sleep(const char *what, const char *name, int64_t ms, int32_t flags) {
    sf__entry e;
    if (!name) name = "";
    if (sf__st.in_step) sf__misuse(what);
    sf__intercept();
    if (sf__peek(&e)) {
        if (e.kind != SF__KIND_SLEEP || !sf__name_is(&e, name)) sf__nondeterminism(SF__OP_SLEEP, name);
        sf__consume(&e);
        return;
    }
    sf__host_sleep(sf__st.seq, name, sf__len32(strlen(name)), ms, flags);
    SF__AFTER_TERMINAL();
}

void step_sleep(const char *name, int64_t duration_ms) {
    sf__sleep("step_sleep", name, duration_ms < 0 ? 0 : duration_ms, 0);
}

void step_sleep_until(const char *name, int64_t unix_ms) {
    sf__sleep("step_sleep_until", name, unix_ms, SF__SLEEP_UNTIL);
}

const char *step_wait_for_event(const char *name, const char *type, int64_t timeout_ms) {
    sf__entry e;
    if (!name) name = "";
    if (!type) type = "";
    if (sf__st.in_step) sf__misuse("step_wait_for_event");
    sf__intercept();
    if (!sf__peek(&e)) {
        sf__host_wait_event(sf__st.seq, name, sf__len32(strlen(name)), type,
                            sf__len32(strlen(type)), timeout_ms < 0 ? -1 : timeout_ms);
        SF__AFTER_TERMINAL();
    }
    if ((e.kind != SF__KIND_EVENT && e.kind != SF__KIND_WAIT_TIMEOUT) || !sf__name_is(&e, name))
        sf__nondeterminism(SF__OP_WAIT, name);
    sf__consume(&e);
    if (e.kind == SF__KIND_WAIT_TIMEOUT) {
        sf__st.last_error = sf__strndup(e.value, e.value_len);
        return NULL;
    }
    sf__st.last_error = "";
    return sf__strndup(e.value, e.value_len);
}

int64_t sf_now(void) {
    sf__entry e;
    if (sf__st.in_step) return sf__host_now(sf__st.seq); /* not recorded: seq is ignored */
    sf__intercept();
    if (!sf__peek(&e)) {
        int64_t now = sf__host_now(sf__st.seq); /* recorded at seq: the journal grew by one */
        sf__st.seq++;
        return now;
    }
    if (e.kind != SF__KIND_NOW) sf__nondeterminism(SF__OP_NOW, "now");
    /* decimal, optional '-', at most 19 digits (no int64 overflow) */
    const char *p = e.value, *end = e.value + e.value_len;
    int neg = p < end && *p == '-';
    int64_t v = 0;
    p += neg;
    if (p == end || end - p > 19) sf__corrupt("stepfleet: malformed now entry");
    for (; p < end; p++) {
        if (*p < '0' || *p > '9') sf__corrupt("stepfleet: malformed now entry");
        uint64_t next = (uint64_t)v * 10 + (uint64_t)(*p - '0');
        if (next > (uint64_t)INT64_MAX) sf__corrupt("stepfleet: malformed now entry");
        v = (int64_t)next;
    }
    sf__consume(&e);
    return neg ? -v : v;
}

static int sf__hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One random call: 1 to SF__RANDOM_MAX bytes. */
static void sf__random_chunk(unsigned char *buf, size_t len) {
    sf__entry e;
    if (sf__st.in_step) { /* not recorded: seq is ignored */
        sf__host_random(sf__st.seq, buf, (int32_t)len);
        return;
    }
    sf__intercept();
    if (!sf__peek(&e)) {
        sf__host_random(sf__st.seq, buf, (int32_t)len); /* recorded at seq */
        sf__st.seq++;
        return;
    }
    if (e.kind != SF__KIND_RANDOM || e.value_len != 2 * len) sf__nondeterminism(SF__OP_RANDOM, "random");
    for (size_t i = 0; i < len; i++) {
        int hi = sf__hex_digit(e.value[2 * i]), lo = sf__hex_digit(e.value[2 * i + 1]);
        if (hi < 0 || lo < 0) sf__corrupt("stepfleet: malformed random entry");
        buf[i] = (unsigned char)(hi << 4 | lo);
    }
    sf__consume(&e);
}

void sf_random(void *buf, size_t len) {
    unsigned char *p = (unsigned char *)buf;
    while (len > 0) {
        size_t n = len < SF__RANDOM_MAX ? len : SF__RANDOM_MAX;
        sf__random_chunk(p, n);
        p += n;
        len -= n;
    }
}

const char *sf_last_error(void) { return sf__st.last_error ? sf__st.last_error : ""; }

const char *sf_fail(const char *msg) {
    if (!msg) msg = "workflow failed";
    if (sf__st.in_step) sf__step_failed(msg, SF__FAILED_NO_RETRY);
    /* Compensate mode: fail is forward-mode only; the compensations take over here. */
    if (sf__st.mode == SF__MODE_COMPENSATE) sf__compensate();
    sf__host_fail(sf__st.seq, msg, sf__len32(strlen(msg)));
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
    sf__host_log(level, sf_buf_cstr(&b), sf__len32(b.len));
    sf_buf_free(&b);
}

const char *sf_instance_id(void) { return sf__st.instance_id ? sf__st.instance_id : ""; }

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


int sf_json_bool(const char *json, const char *key, int def) {
    const char *p = sf__json_find(json, key), *e = p ? sf__json_skip(p) : NULL;
    if (!e) return def;
    if (e - p == 4 && memcmp(p, "true", 4) == 0) return 1;
    if (e - p == 5 && memcmp(p, "false", 5) == 0) return 0;
    return def;
}

const char *sf_json_raw(const char *json, const char *key, size_t *len) {
    const char *p = sf__json_find(json, key), *e = p ? sf__json_skip(p) : NULL;
    if (len) *len = e ? (size_t)(e - p) : 0;
    return e ? p : NULL;
}

static int sf__json_iter_begin(sf_json_iter *it, const char *json, char open, char close) {
    const char *p = json ? sf__json_ws(json) : "";
    it->p = p;
    it->state = -1;
    if (*p != open) return 0;
    it->p = p = sf__json_ws(p + 1);
    it->state = *p == close ? 1 : 0;
    return 1;
}

/* After an element or member ending at p: a comma and another one, or the closing bracket. */
static void sf__json_iter_after(sf_json_iter *it, const char *p, char close) {
    p = sf__json_ws(p);
    if (*p == ',') {
        p = sf__json_ws(p + 1);
        it->state = (*p == close || *p == ',' || *p == '\0') ? -1 : 0;
    } else {
        it->state = *p == close ? 1 : -1;
    }
    it->p = p;
}

int sf_json_array_begin(sf_json_iter *it, const char *json) {
    return sf__json_iter_begin(it, json, '[', ']');
}

int sf_json_array_next(sf_json_iter *it, const char **elem, size_t *len) {
    if (it->state != 0) return it->state > 0 ? 0 : -1;
    const char *e = sf__json_skip(it->p);
    if (!e) {
        it->state = -1;
        return -1;
    }
    if (elem) *elem = it->p;
    if (len) *len = (size_t)(e - it->p);
    sf__json_iter_after(it, e, ']');
    return 1;
}

int sf_json_object_begin(sf_json_iter *it, const char *json) {
    return sf__json_iter_begin(it, json, '{', '}');
}

int sf_json_object_next(sf_json_iter *it, char *key, size_t keylen, const char **value,
                        size_t *len) {
    const char *p = it->p, *e;
    long n;
    if (keylen) key[0] = '\0';
    if (it->state != 0) return it->state > 0 ? 0 : -1;
    if (*p != '"' || (n = sf__json_decode_str(p, key, keylen ? keylen - 1 : 0, &e)) < 0) {
        it->state = -1;
        return -1;
    }
    if (keylen) key[(size_t)n < keylen ? (size_t)n : keylen - 1] = '\0';
    p = sf__json_ws(e);
    if (*p != ':' || !(e = sf__json_skip(p = sf__json_ws(p + 1)))) {
        if (keylen) key[0] = '\0';
        it->state = -1;
        return -1;
    }
    if (value) *value = p;
    if (len) *len = (size_t)(e - p);
    sf__json_iter_after(it, e, '}');
    return 1;
}

/* ---- HTTP ---- */

/* Last in the file, so that modules which do not call it build to the same bytes as before
 * it existed (the linker drops it, and the function types it adds come after the others). */
int sf_http(const char *method, const char *url, const char *headers_json, const char *body,
            sf_buf *response) {
    static const char bad_headers[] = "sf_http: headers_json must be a JSON object of strings";
    sf_json_iter it;
    const char *value;
    size_t value_len;
    int r;
    if (!sf__st.in_step)
        sf_fail("sf_http called outside a step function: HTTP calls must run inside a step");
    if (!headers_json) headers_json = "{}";
    if (!sf_json_object_begin(&it, headers_json)) {
        sf__st.last_error = bad_headers;
        return -1;
    }
    while ((r = sf_json_object_next(&it, NULL, 0, &value, &value_len)) > 0)
        if (*value != '"') break;
    if (r != 0) {
        sf__st.last_error = bad_headers;
        return -1;
    }
    /* it.p is at the object's closing brace: text after it is not sent. */
    sf_buf req = SF_BUF_INIT;
    sf_buf_puts(&req, "{\"method\":");
    sf_buf_json_str(&req, method ? method : "GET");
    sf_buf_puts(&req, ",\"url\":");
    sf_buf_json_str(&req, url ? url : "");
    sf_buf_puts(&req, ",\"headers\":");
    sf_buf_append(&req, headers_json, (size_t)(it.p + 1 - headers_json));
    sf_buf_puts(&req, ",\"body\":");
    sf_buf_json_str(&req, body ? body : "");
    sf_buf_puts(&req, "}");
    int32_t n = sf__host_http_request(sf_buf_cstr(&req), sf__len32(req.len));
    sf_buf_free(&req);
    if (n < 0) {
        sf__st.last_error = "sf_http: the host refused the call";
        return -1;
    }
    char *answer = (char *)sf__xmalloc((size_t)n + 1);
    sf__host_http_response(answer, n);
    answer[n] = '\0';
    if (sf_json_raw(answer, "error", NULL)) {
        long m = sf_json_str(answer, "error", NULL, 0);
        char *msg = (char *)sf__xmalloc(m < 0 ? 1 : (size_t)m + 1);
        if (m < 0) msg[0] = '\0';
        else sf_json_str(answer, "error", msg, (size_t)m + 1);
        free(answer);
        sf__st.last_error = m < 0 ? "sf_http: the host's error is not a string" : msg;
        return -1;
    }
    long long status = sf_json_int(answer, "status", -1);
    if (status < 100 || status > 999) {
        free(answer);
        sf__st.last_error = "sf_http: the host's answer has no status";
        return -1;
    }
    if (response) sf_buf_append(response, answer, (size_t)n);
    free(answer);
    sf__st.last_error = "";
    return (int)status;
}

#ifdef __cplusplus
}
#endif

#endif /* STEPFLEET_DECLARATIONS_ONLY */
#endif /* STEPFLEET_H */
