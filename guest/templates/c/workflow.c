/* A stepfleet workflow: one step that greets the "name" in the params, then completes with it.
 * Build: make (writes workflow.wasm). Try it: stepfleet run workflow.wasm. */

#include <stdio.h>
#include <string.h>

#include "stepfleet.h"

/* Step functions are top-level functions (C has no closures): the SDK calls them through a
 * pointer, with the step's input, and they write their result (JSON) to `out`. */
static int greet(const char *input, sf_buf *out) {
    char name[128], text[160];
    if (sf_json_str(input, "name", name, sizeof name) < 1) strcpy(name, "world");
    snprintf(text, sizeof text, "Hello, %s", name);
    sf_buf_puts(out, "{\"greeting\":");
    sf_buf_json_str(out, text);
    sf_buf_puts(out, "}");
    return SF_OK; /* or SF_ERROR (retried) / SF_ERROR_NO_RETRY, with the message in out */
}

const char *sf_workflow(const char *params) {
    const char *greeting = step_do("greet", greet, params);
    if (!greeting) return sf_failf("greet failed: %s", sf_last_error());
    return greeting; /* the output JSON: completes the instance */
}
