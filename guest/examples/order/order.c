/*
 * Order workflow: reserve inventory, charge payment, ship. See README.md for params and output.
 *
 * reserve registers a rollback (release) that the host runs if the instance fails later;
 * charge is retried up to 3 times with exponential backoff.
 *
 * Test hook: params "fail_at" names a step ("reserve", "charge" or "ship") that then fails.
 * "fail_mode" absent: the failure is non-retryable; "retry": retryable, on every attempt;
 * "once": retryable, on attempt 1 only (attempt 2 succeeds).
 */
#include "stepfleet.h"

#include <stdint.h>

/* Step functions see only their input; the failure hook needs the params, which are constant
 * for the run, so they are kept here. */
static const char *g_params;

static int injected_failure(const char *step, const char *what, const char *order, sf_buf *out) {
    char fail_at[16], mode[16];
    if (sf_json_str(g_params, "fail_at", fail_at, sizeof fail_at) < 0 || strcmp(fail_at, step) != 0)
        return SF_OK;
    sf_json_str(g_params, "fail_mode", mode, sizeof mode);
    if (strcmp(mode, "once") == 0 && sf_attempt() > 1) return SF_OK;
    sf_buf_printf(out, "%s for order %s", what, order);
    return mode[0] ? SF_ERROR : SF_ERROR_NO_RETRY; /* "retry" or "once": retryable */
}

/* A stable stand-in for a carrier's tracking number: FNV-1a over the payment id. */
static uint32_t fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* Appends "key":"<printf text>" with the text JSON-escaped (order ids may hold any character). */
__attribute__((format(printf, 3, 4))) static void put_str(sf_buf *out, const char *key, const char *fmt, ...) {
    sf_buf tmp = SF_BUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    sf_buf_vprintf(&tmp, fmt, ap);
    va_end(ap);
    sf_buf_json_str(out, key);
    sf_buf_puts(out, ":");
    sf_buf_json_str(out, sf_buf_cstr(&tmp));
    sf_buf_free(&tmp);
}

/* input: params. result: {"reservation":"RSV-<order>","items":<items>} */
static int reserve(const char *input, sf_buf *out) {
    char order[64];
    sf_json_str(input, "order_id", order, sizeof order);
    long long items = sf_json_int(input, "items", 1);
    int rc = injected_failure("reserve", "out of stock", order, out);
    if (rc != SF_OK) return rc;
    sf_log(SF_LOG_INFO, "reserving %lld item(s) for order %s", items, order);
    sf_buf_puts(out, "{");
    put_str(out, "reservation", "RSV-%s", order);
    sf_buf_printf(out, ",\"items\":%lld}", items);
    return SF_OK;
}

/* input: {"order_id","amount","reservation"}. result: {"charged":<amount>,"payment":"PAY-..."} */
static int charge(const char *input, sf_buf *out) {
    char order[64];
    sf_json_str(input, "order_id", order, sizeof order);
    long long amount = sf_json_int(input, "amount", 0);
    int rc = injected_failure("charge", "card declined", order, out);
    if (rc != SF_OK) return rc;
    sf_log(SF_LOG_INFO, "charging %lld for order %s", amount, order);
    sf_buf_printf(out, "{\"charged\":%lld,", amount);
    put_str(out, "payment", "PAY-%s-%lld", order, amount);
    sf_buf_puts(out, "}");
    return SF_OK;
}

/* input: {"order_id","payment"}. result: {"tracking":"TRK-<order>-<hash of payment>"} */
static int ship(const char *input, sf_buf *out) {
    char order[64], payment[128];
    sf_json_str(input, "order_id", order, sizeof order);
    sf_json_str(input, "payment", payment, sizeof payment);
    int rc = injected_failure("ship", "no carrier available", order, out);
    if (rc != SF_OK) return rc;
    sf_buf_puts(out, "{");
    put_str(out, "tracking", "TRK-%s-%08X", order, (unsigned)fnv1a(payment));
    sf_buf_puts(out, "}");
    return SF_OK;
}

/* Rollback of reserve, run by the host's compensations if the instance fails after reserve
 * succeeded. input: reserve's recorded result. result: {"released":"RSV-..."} */
static int release(const char *input, sf_buf *out) {
    char reservation[128];
    sf_json_str(input, "reservation", reservation, sizeof reservation);
    sf_buf_puts(out, "{\"released\":");
    sf_buf_json_str(out, reservation);
    sf_buf_puts(out, "}");
    return SF_OK;
}

const char *sf_workflow(const char *params) {
    char order[64], reservation[128], payment[128], tracking[128], text[16];
    sf_buf in = SF_BUF_INIT, out = SF_BUF_INIT;
    g_params = params;

    long order_len = sf_json_str(params, "order_id", order, sizeof order);
    if (order_len <= 0 || (size_t)order_len >= sizeof order)
        return sf_fail("params.order_id must be a string of 1 to 63 bytes");
    long long amount = sf_json_int(params, "amount", -1);
    if (amount < 0) return sf_fail("params.amount must be a non-negative integer");
    long long items = sf_json_int(params, "items", 1);
    if (items < 1) return sf_fail("params.items must be a positive integer");
    long long retry_delay_ms = 1000;
    if (sf_json_raw(params, "retry_delay_ms", NULL)) {
        retry_delay_ms = sf_json_int(params, "retry_delay_ms", -1);
        if (retry_delay_ms < 0) return sf_fail("params.retry_delay_ms must be a non-negative integer");
    }
    if (sf_json_raw(params, "fail_at", NULL)) {
        long n = sf_json_str(params, "fail_at", text, sizeof text);
        if (n < 0 || (size_t)n >= sizeof text ||
            (strcmp(text, "reserve") != 0 && strcmp(text, "charge") != 0 && strcmp(text, "ship") != 0))
            return sf_fail("params.fail_at must be \"reserve\", \"charge\" or \"ship\"");
    }
    if (sf_json_raw(params, "fail_mode", NULL)) {
        long n = sf_json_str(params, "fail_mode", text, sizeof text);
        if (n < 0 || (size_t)n >= sizeof text || (strcmp(text, "retry") != 0 && strcmp(text, "once") != 0))
            return sf_fail("params.fail_mode must be \"retry\" or \"once\"");
    }

    sf_step_config reserve_config = SF_STEP_CONFIG_DEFAULT;
    reserve_config.rollback = release;
    const char *r = step_do_with("reserve", reserve, params, &reserve_config);
    if (!r) return sf_failf("reserve failed: %s", sf_last_error());
    sf_json_str(r, "reservation", reservation, sizeof reservation);

    sf_buf_puts(&in, "{\"order_id\":");
    sf_buf_json_str(&in, order);
    sf_buf_printf(&in, ",\"amount\":%lld,\"reservation\":", amount);
    sf_buf_json_str(&in, reservation);
    sf_buf_puts(&in, "}");
    sf_step_config charge_config = SF_STEP_CONFIG_DEFAULT;
    charge_config.retries_limit = 3;
    charge_config.retry_delay_ms = retry_delay_ms;
    charge_config.backoff = SF_BACKOFF_EXPONENTIAL;
    const char *c = step_do_with("charge", charge, sf_buf_cstr(&in), &charge_config);
    if (!c) return sf_failf("charge failed: %s", sf_last_error());
    long long charged = sf_json_int(c, "charged", 0);
    sf_json_str(c, "payment", payment, sizeof payment);

    sf_buf_reset(&in);
    sf_buf_puts(&in, "{\"order_id\":");
    sf_buf_json_str(&in, order);
    sf_buf_puts(&in, ",\"payment\":");
    sf_buf_json_str(&in, payment);
    sf_buf_puts(&in, "}");
    const char *s = step_do("ship", ship, sf_buf_cstr(&in));
    if (!s) return sf_failf("ship failed: %s", sf_last_error());
    sf_json_str(s, "tracking", tracking, sizeof tracking);

    sf_buf_puts(&out, "{\"order\":");
    sf_buf_json_str(&out, order);
    sf_buf_puts(&out, ",\"reservation\":");
    sf_buf_json_str(&out, reservation);
    sf_buf_printf(&out, ",\"items\":%lld,\"charged\":%lld,\"tracking\":", items, charged);
    sf_buf_json_str(&out, tracking);
    sf_buf_puts(&out, "}");
    return sf_buf_cstr(&out);
}
