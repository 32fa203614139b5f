// Reminder workflow: schedule a reminder, sleep until it is due, remind the user, wait for the
// acknowledgement (or a timeout), record the outcome. Shows the guest ABI version 2 primitives:
// recorded now() and random(), a durable sleepUntil, a step with retries, a timeout and a
// rollback, and waitForEvent. See README.md for params, runs and output.
//
// Test hook: params "fail_after_remind": true fails the workflow after the wait with
// "reminder failed on purpose", so the host rolls back: the rollback of "remind" cancels it.

import {
  run, stepDo, stepDoWith, sleepUntil, waitForEvent, now, random, randomHex, toHex, attempt, ok, fail,
  lastError, log, jsonStr, jsonInt, jsonRaw, jsonQuote, Outcome, StepConfig, BACKOFF_CONSTANT, LOG_INFO,
} from "../../sdk/assemblyscript/assembly/index";
export { sf_abi_version, sf_alloc } from "../../sdk/assemblyscript/assembly/index";

export function sf_run(ptr: usize, len: usize): void {
  run(ptr, len, workflow);
}

// Longest delay and wait timeout the host accepts by default: 365 days.
const MAX_MS: i64 = 31536000000;

// input: {"id","due"}. result: the same object, as a store would confirm it.
function schedule(input: string): Outcome {
  const id = jsonStr(input, "id");
  const due = jsonInt(input, "due", 0);
  return ok("{\"id\":" + jsonQuote(id !== null ? id : "") + ",\"due\":" + due.toString() + "}");
}

// input: {"user","id"}. result: {"reminded":"ada","id":"<hex>","delivery":"<hex>"}; the
// delivery id is random() inside a step: not a journal entry of its own, the result records it.
function remind(input: string): Outcome {
  const user = jsonStr(input, "user");
  const id = jsonStr(input, "id");
  const u = user !== null ? user : "";
  const i = id !== null ? id : "";
  log(LOG_INFO, "reminding " + u + " of reminder " + i + " (attempt " + attempt().toString() + ")");
  return ok("{\"reminded\":" + jsonQuote(u) + ",\"id\":" + jsonQuote(i) +
    ",\"delivery\":" + jsonQuote(randomHex(2)) + "}");
}

// Rollback of remind. input: remind's recorded result. result: {"cancelled":"<hex>"}
function cancel(input: string): Outcome {
  const id = jsonStr(input, "id");
  const i = id !== null ? id : "";
  log(LOG_INFO, "cancelling reminder " + i);
  return ok("{\"cancelled\":" + jsonQuote(i) + "}");
}

// input: {"id","acked":bool}. result: {"recorded":"<hex>","acked":bool,"at":<ms>}; "at" is
// now() inside a step: not recorded on its own, the result records it.
function record(input: string): Outcome {
  const id = jsonStr(input, "id");
  const acked = jsonRaw(input, "acked");
  return ok("{\"recorded\":" + jsonQuote(id !== null ? id : "") +
    ",\"acked\":" + (acked !== null && acked == "true" ? "true" : "false") +
    ",\"at\":" + now().toString() + "}");
}

function workflow(p: string): string {
  const user = jsonStr(p, "user");
  if (user === null || user.length == 0) return fail("params.user must be a non-empty string");
  const delayMs = jsonInt(p, "delay_ms", -1);
  if (delayMs < 0 || delayMs > MAX_MS) {
    return fail("params.delay_ms must be an integer from 0 to " + MAX_MS.toString());
  }
  let timeoutMs: i64 = -1; // the host's default, 24 hours
  if (jsonRaw(p, "timeout_ms") !== null) {
    timeoutMs = jsonInt(p, "timeout_ms", -1);
    if (timeoutMs < 1 || timeoutMs > MAX_MS) {
      return fail("params.timeout_ms must be an integer from 1 to " + MAX_MS.toString());
    }
  }
  const failHook = jsonRaw(p, "fail_after_remind");
  if (failHook !== null && failHook != "true" && failHook != "false") {
    return fail("params.fail_after_remind must be true or false");
  }

  const t0 = now(); // recorded: every replay sees the same time
  const id = toHex(random(4)); // recorded too

  const s = stepDo("schedule", schedule,
    "{\"id\":" + jsonQuote(id) + ",\"due\":" + (t0 + delayMs).toString() + "}");
  if (s === null) return fail("schedule failed: " + lastError());
  const due = jsonInt(s, "due", t0 + delayMs);

  sleepUntil("until-due", due);

  const remindConfig = new StepConfig();
  remindConfig.retryLimit = 3;
  remindConfig.retryDelayMs = 1000;
  remindConfig.backoff = BACKOFF_CONSTANT;
  remindConfig.timeoutMs = 5000;
  remindConfig.rollback = cancel;
  const r = stepDoWith("remind", remind,
    "{\"user\":" + jsonQuote(user) + ",\"id\":" + jsonQuote(id) + "}", remindConfig);
  if (r === null) return fail("remind failed: " + lastError());

  const ack = waitForEvent("ack", "reminder.ack", timeoutMs);
  const timedOut = ack === null;

  if (failHook !== null && failHook == "true") return fail("reminder failed on purpose");

  const rec = stepDo("record", record,
    "{\"id\":" + jsonQuote(id) + ",\"acked\":" + (timedOut ? "false" : "true") + "}");
  if (rec === null) return fail("record failed: " + lastError());

  return "{\"user\":" + jsonQuote(user) +
    ",\"id\":" + jsonQuote(id) +
    ",\"acked\":" + (ack !== null ? ack : "null") +
    ",\"timed_out\":" + (timedOut ? "true" : "false") + "}";
}
