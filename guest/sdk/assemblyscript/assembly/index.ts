// stepfleet guest SDK for AssemblyScript (guest ABI version 2). Contract: docs/guest-abi.md.
//
// A workflow module's entry file looks like this (paths relative to guest/examples/NAME/):
//
//   import { run, stepDo, ok, fail, lastError } from "../../sdk/assemblyscript/assembly/index";
//   export { sf_abi_version, sf_alloc } from "../../sdk/assemblyscript/assembly/index";
//   export function sf_run(ptr: usize, len: usize): void { run(ptr, len, workflow); }
//   function workflow(params: string): string { ...; return outputJson; }
//
// Build with --runtime stub and route aborts to this SDK so the module imports only stepfleet:
//   asc entry.ts --runtime stub --use abort=<internal path of this file>/stepfleetAbort -o x.wasm
//
// HTTP: http() calls the outside world through the host's egress gateway, inside step functions
// only (their results are recorded, so a call is never repeated on replay).
//
// Replay: every primitive (stepDo, sleep, waitForEvent, now, random) is answered from the
// journal in the replay buffer without calling the host while the journal has an entry at the
// current position. The first primitive that is not recorded does the new work and reports it
// through a terminal import (the host then stops the guest); now and random record their value
// and let the run go on. Returning from the workflow completes the instance.
//
// AssemblyScript has no catchable exceptions, so failures are return values: a step that failed
// for good and a wait that timed out return null, and lastError() holds the message.
//
// Compensate mode (the host sets it to run rollbacks): the program is replayed as usual; when it
// reaches the end of the journal or a "compensated" entry, the SDK stops it and runs the next
// rollback of the steps that completed, in reverse order, one per run.
//
// Workflow code must be deterministic in which primitives it asks for, in which order, with
// which names; nondeterministic work belongs inside step functions or goes through now/random.

// ---- Host imports ------------------------------------------------------------------------------

@external("stepfleet", "step_begin")
declare function hostStepBegin(
  seq: i32, namePtr: usize, nameLen: i32, configPtr: usize, configLen: i32): i32;
@external("stepfleet", "step_done")
declare function hostStepDone(
  seq: i32, namePtr: usize, nameLen: i32, resultPtr: usize, resultLen: i32, flags: i32): void;
@external("stepfleet", "step_failed")
declare function hostStepFailed(
  seq: i32, namePtr: usize, nameLen: i32, msgPtr: usize, msgLen: i32, flags: i32): void;
@external("stepfleet", "sleep")
declare function hostSleep(seq: i32, namePtr: usize, nameLen: i32, ms: i64, flags: i32): void;
@external("stepfleet", "wait_event")
declare function hostWaitEvent(
  seq: i32, namePtr: usize, nameLen: i32, typePtr: usize, typeLen: i32, timeoutMs: i64): void;
@external("stepfleet", "now")
declare function hostNow(seq: i32): i64;
@external("stepfleet", "random")
declare function hostRandom(seq: i32, ptr: usize, len: i32): void;
@external("stepfleet", "complete")
declare function hostComplete(seq: i32, outputPtr: usize, outputLen: i32): void;
@external("stepfleet", "fail")
declare function hostFail(seq: i32, msgPtr: usize, msgLen: i32): void;
@external("stepfleet", "nondeterminism")
declare function hostNondeterminism(seq: i32, op: i32, namePtr: usize, nameLen: i32): void;
@external("stepfleet", "log")
declare function hostLog(level: i32, msgPtr: usize, msgLen: i32): void;
// Imported only by modules that call http() (unused imports are left out of the module).
@external("stepfleet", "http_request")
declare function hostHttpRequest(requestPtr: usize, requestLen: i32): i32;
@external("stepfleet", "http_response")
declare function hostHttpResponse(ptr: usize, len: i32): void;

// ---- Public constants and types ----------------------------------------------------------------

/** The guest ABI version this SDK speaks. */
export const ABI_VERSION: i32 = 2;

/** Log levels for log(). */
export const LOG_DEBUG: i32 = 0;
export const LOG_INFO: i32 = 1;
export const LOG_WARN: i32 = 2;
export const LOG_ERROR: i32 = 3;

/** Retry backoff for StepConfig.backoff. BACKOFF_DEFAULT leaves it to the host (exponential). */
export const BACKOFF_DEFAULT: i32 = 0;
export const BACKOFF_CONSTANT: i32 = 1; // delay
export const BACKOFF_LINEAR: i32 = 2; // delay × n
export const BACKOFF_EXPONENTIAL: i32 = 3; // delay × 2^(n-1)

/** Most bytes random() returns per call. */
export const RANDOM_MAX: i32 = 256;

/** What a step function returns; build it with ok(), error() or errorNoRetry(). */
export class Outcome {
  constructor(
    /** true: value is the result (JSON text); false: value is the error message. */
    public succeeded: bool,
    public value: string,
    /** For failures: false sets step_failed flags bit 0 (do not retry). */
    public retry: bool,
  ) {}
}

/** A step function (and a rollback): gets its input, returns an Outcome. */
export type StepFn = (input: string) => Outcome;

/** A workflow: gets the params (JSON text), returns the output (JSON text) or `return fail(msg)`. */
export type WorkflowFn = (params: string) => string;

/** Options of one step for stepDoWith. Every field left unset keeps the host's default and is
 *  left out of the step_begin config JSON; with all unset the config is sent empty. Values out
 *  of the documented ranges are sent as they are and the host refuses them (never clamped). */
export class StepConfig {
  /** Retries after the first attempt, 0 to 1,000 (host default 5). Negative: unset. */
  retryLimit: i32 = -1;
  /** Base retry delay in ms, 0 to 365 days (host default 10,000). Negative: unset. */
  retryDelayMs: i64 = -1;
  /** BACKOFF_CONSTANT, BACKOFF_LINEAR or BACKOFF_EXPONENTIAL; BACKOFF_DEFAULT: unset
   *  (host default exponential). */
  backoff: i32 = BACKOFF_DEFAULT;
  /** Wall-clock limit of each attempt in ms, at most 365 days (host default 600,000). Negative:
   *  unset. */
  timeoutMs: i64 = -1;
  /** Compensation: called with the step's recorded result when the instance is rolled back.
   *  Retried with the step's retry policy. */
  rollback: StepFn | null = null;
  /** The result is stored (replay needs it) but shown as <redacted> in status, lists and logs. */
  sensitive: bool = false;

  /** The step_begin config JSON; "" when every field is unset. */
  toJson(): string {
    let retries = "";
    if (this.retryLimit >= 0) retries = "\"limit\":" + this.retryLimit.toString();
    if (this.retryDelayMs >= 0) {
      retries += (retries.length ? "," : "") + "\"delay_ms\":" + this.retryDelayMs.toString();
    }
    if (this.backoff != BACKOFF_DEFAULT) {
      const b = this.backoff;
      // An unknown value goes out as a number, which the host refuses by name.
      const text = b == BACKOFF_CONSTANT ? "\"constant\""
        : b == BACKOFF_LINEAR ? "\"linear\""
        : b == BACKOFF_EXPONENTIAL ? "\"exponential\""
        : b.toString();
      retries += (retries.length ? "," : "") + "\"backoff\":" + text;
    }
    let json = retries.length ? "\"retries\":{" + retries + "}" : "";
    if (this.timeoutMs >= 0) {
      json += (json.length ? "," : "") + "\"timeout_ms\":" + this.timeoutMs.toString();
    }
    return json.length ? "{" + json + "}" : "";
  }
}

/** Step success with result `json` (JSON text; "" is recorded as null). */
export function ok(json: string): Outcome {
  return new Outcome(true, json, true);
}

/** Step failure with message `msg`; the host may retry the step. */
export function error(msg: string): Outcome {
  return new Outcome(false, msg, true);
}

/** Step failure with message `msg` that must not be retried. */
export function errorNoRetry(msg: string): Outcome {
  return new Outcome(false, msg, false);
}

// ---- Replay state for the current run ----------------------------------------------------------

const MODE_FORWARD: u32 = 0;
const MODE_COMPENSATE: u32 = 1;

const KIND_STEP_OK: i32 = 1;
const KIND_STEP_FAILED: i32 = 2;
const KIND_SLEEP: i32 = 3;
const KIND_EVENT: i32 = 4;
const KIND_WAIT_TIMEOUT: i32 = 5;
const KIND_NOW: i32 = 6;
const KIND_RANDOM: i32 = 7;
const KIND_COMPENSATED: i32 = 8;

const OP_STEP: i32 = 1;
const OP_SLEEP: i32 = 2;
const OP_WAIT: i32 = 3;
const OP_NOW: i32 = 4;
const OP_RANDOM: i32 = 5;
const OP_COMPENSATION: i32 = 6;

const DONE_HAS_ROLLBACK: i32 = 1;
const DONE_SENSITIVE: i32 = 2;
const DONE_COMPENSATION: i32 = 4;
const FAILED_NO_RETRY: i32 = 1;
const SLEEP_UNTIL: i32 = 1;

// A replayed step with a rollback, remembered in compensate mode.
class Rollback {
  constructor(
    public name: string,
    public result: string,
    public config: string,
    public fn: StepFn,
    public sensitive: bool,
  ) {}
}

let cur: usize = 0; // unread part of the replay buffer: [cur, end)
let end: usize = 0;
let mode: u32 = MODE_FORWARD;
let entriesLeft: u32 = 0; // journal entries not replayed yet
let seq: i32 = 0; // journal position reached (now/random recorded in this run included)
let currentInstanceId: string = "";
let lastErr: string = "";
let currentStep: string | null = null; // name of the step function (or rollback) running, if any
let stepAttempt: i32 = 0; // what step_begin returned for it
let rollbacks: Rollback[] = [];

// Strings cross the ABI as UTF-8; lone surrogates become U+FFFD so the host always gets UTF-8.
function utf8(s: string): ArrayBuffer {
  return String.UTF8.encode(s, false, String.UTF8.ErrorMode.REPLACE);
}

function logRaw(level: i32, msg: string): void {
  const b = utf8(msg);
  hostLog(level, changetype<usize>(b), b.byteLength);
}

// The host wrote a buffer this SDK cannot read; nothing sensible to report through the ABI.
function corrupt(what: string): void {
  logRaw(LOG_ERROR, "stepfleet: " + what);
  unreachable();
}

function readU32(): u32 {
  if (end - cur < 4) corrupt("replay buffer truncated");
  const v = load<u32>(cur); // wasm is little-endian, like the buffer
  cur += 4;
  return v;
}

// Returns the pointer to the bytes; their length is left in readLen.
let readLen: u32 = 0;
function readBytes(): usize {
  readLen = readU32();
  if (<usize>(end - cur) < <usize>readLen) corrupt("replay buffer truncated");
  const p = cur;
  cur += readLen;
  return p;
}

function readString(): string {
  const p = readBytes();
  return String.UTF8.decodeUnsafe(p, readLen);
}

// The entry at seq, read by readEntry (the caller then checks it and calls consumeEntry).
let entKind: i32 = 0;
let entName: usize = 0;
let entNameLen: u32 = 0;
let entValue: usize = 0;
let entValueLen: u32 = 0;

function readEntry(): void {
  if (cur >= end) corrupt("replay buffer truncated");
  entKind = <i32>load<u8>(cur);
  cur += 1;
  entName = readBytes();
  entNameLen = readLen;
  entValue = readBytes();
  entValueLen = readLen;
}

function consumeEntry(): void {
  seq++;
  entriesLeft--;
}

function entryNameIs(name: ArrayBuffer): bool {
  const len = name.byteLength;
  return entNameLen == <u32>len && memory.compare(entName, changetype<usize>(name), len) == 0;
}

function entryName(): string {
  return String.UTF8.decodeUnsafe(entName, entNameLen);
}

function entryValue(): string {
  return String.UTF8.decodeUnsafe(entValue, entValueLen);
}

// The program asked for `op` named `name` at seq, but the journal holds something else there.
function nondeterminism(op: i32, name: ArrayBuffer): void {
  hostNondeterminism(seq, op, changetype<usize>(name), name.byteLength);
  unreachable();
}

// The value of a now or sleep entry: a non-negative decimal integer; -1 if malformed.
function entryDecimal(): i64 {
  if (entValueLen == 0 || entValueLen > 18) return -1; // 18 digits cannot overflow i64
  let v: i64 = 0;
  for (let i: u32 = 0; i < entValueLen; i++) {
    const c = <i32>load<u8>(entValue + i);
    if (c < 0x30 || c > 0x39) return -1;
    v = v * 10 + <i64>(c - 0x30);
  }
  return v;
}

// Every primitive reached outside a step function starts here. In compensate mode, reaching a
// compensated entry or the end of the journal stops the program and runs compensations.
function reach(): void {
  if (mode != MODE_COMPENSATE) return;
  if (entriesLeft == 0) compensate();
  if (cur >= end) corrupt("replay buffer truncated");
  if (<i32>load<u8>(cur) == KIND_COMPENSATED) compensate();
}

// Reports a step (or compensation) begun at seq; never returns.
function finishStep(name: ArrayBuffer, o: Outcome, doneFlags: i32): void {
  if (o.succeeded) {
    const res = utf8(o.value.length ? o.value : "null");
    hostStepDone(seq, changetype<usize>(name), name.byteLength, changetype<usize>(res), res.byteLength,
      doneFlags);
  } else {
    const msg = utf8(o.value.length ? o.value : "step failed");
    hostStepFailed(seq, changetype<usize>(name), name.byteLength, changetype<usize>(msg), msg.byteLength,
      o.retry ? 0 : FAILED_NO_RETRY);
  }
  unreachable(); // a terminal import returned: the host broke the contract
}

// Runs `fn(input)` as the step `name` begun at seq with `config`; never returns.
function runStep(name: string, fn: StepFn, input: string, config: string, doneFlags: i32): void {
  const nameBuf = utf8(name);
  const cfg = utf8(config);
  stepAttempt = hostStepBegin(seq, changetype<usize>(nameBuf), nameBuf.byteLength,
    changetype<usize>(cfg), cfg.byteLength);
  currentStep = name;
  const o = fn(input);
  currentStep = null;
  finishStep(nameBuf, o, doneFlags);
}

// Compensate mode, at a compensated entry or the end of the journal: checks the compensated
// entries against the remembered rollbacks (last first), then runs the next one or completes.
function compensate(): void {
  const n = rollbacks.length;
  let k = 0;
  while (entriesLeft > 0) {
    readEntry();
    if (k < n) {
      const expected = utf8(rollbacks[n - 1 - k].name);
      if (entKind != KIND_COMPENSATED || !entryNameIs(expected)) nondeterminism(OP_COMPENSATION, expected);
    } else {
      // More compensated entries than rollbacks: nothing was asked for; name what is there.
      nondeterminism(OP_COMPENSATION, utf8(entNameLen ? entryName() : "compensation"));
    }
    k++;
    consumeEntry();
  }
  if (k == n) {
    const out = utf8("null"); // ignored by the host in compensate mode
    hostComplete(seq, changetype<usize>(out), out.byteLength);
    unreachable();
  }
  const r = rollbacks[n - 1 - k];
  runStep(r.name, r.fn, r.result, r.config, DONE_COMPENSATION | (r.sensitive ? DONE_SENSITIVE : 0));
}

// ---- Exports the module re-exports -------------------------------------------------------------

/** Export: the ABI version. Re-export it from the entry file. */
export function sf_abi_version(): i32 {
  return ABI_VERSION;
}

/** Export: memory for the replay buffer. Re-export it from the entry file. With the stub runtime
 *  an allocation the memory cap refuses traps instead of returning 0. */
export function sf_alloc(len: i32): usize {
  if (len < 0) return 0;
  return heap.alloc(<usize>len);
}

/** Runs `workflow` over the replay buffer; call it from the entry file's exported sf_run. */
export function run(ptr: usize, len: usize, workflow: WorkflowFn): void {
  cur = ptr;
  end = ptr + len;
  const version = readU32();
  if (version != <u32>ABI_VERSION) {
    corrupt("replay buffer ABI version is " + version.toString() + ", not " + ABI_VERSION.toString());
  }
  mode = readU32();
  if (mode != MODE_FORWARD && mode != MODE_COMPENSATE) {
    corrupt("replay buffer mode " + mode.toString() + " is unknown");
  }
  readU32(); // attempt of the next new step; step_begin returns it too
  currentInstanceId = readString();
  const params = readString();
  entriesLeft = readU32();
  seq = 0;
  lastErr = "";
  currentStep = null;
  stepAttempt = 0;
  rollbacks = [];
  const output = workflow(params);
  reach();
  const out = utf8(output);
  hostComplete(seq, changetype<usize>(out), out.byteLength);
  unreachable(); // a terminal import returned: the host broke the contract
}

// ---- Workflow API ------------------------------------------------------------------------------

/** Runs step `name` at the current journal position with the host's default config.
 *  Recorded success: returns the recorded result (JSON text) without running fn.
 *  Recorded failure (after the last attempt): returns null; lastError() gives the message.
 *  Not recorded yet: runs fn(input) and reports the outcome to the host; never returns.
 *  A recorded entry of another kind or name reports nondeterminism; never returns.
 *  Inside a step function it fails that step without retry. */
export function stepDo(name: string, fn: StepFn, input: string = ""): string | null {
  return stepDoWith(name, fn, input, null);
}

/** stepDo with retries, timeout, rollback and sensitivity from `config` (null: all defaults). */
export function stepDoWith(
  name: string, fn: StepFn, input: string, config: StepConfig | null,
): string | null {
  if (currentStep !== null) fail("stepDo(" + jsonQuote(name) + ") called inside a step function");
  reach();
  const nameBuf = utf8(name);
  const cfgJson = config !== null ? config.toJson() : "";
  const rollback: StepFn | null = config !== null ? config.rollback : null;
  const sensitive = config !== null && config.sensitive;

  if (entriesLeft > 0) {
    readEntry();
    const kind = entKind;
    if ((kind != KIND_STEP_OK && kind != KIND_STEP_FAILED) || !entryNameIs(nameBuf)) {
      nondeterminism(OP_STEP, nameBuf);
    }
    const value = entryValue();
    consumeEntry();
    if (kind == KIND_STEP_FAILED) {
      lastErr = value;
      return null;
    }
    lastErr = "";
    if (mode == MODE_COMPENSATE && rollback !== null) {
      rollbacks.push(new Rollback(name, value, cfgJson, rollback, sensitive));
    }
    return value;
  }

  runStep(name, fn, input, cfgJson,
    (rollback !== null ? DONE_HAS_ROLLBACK : 0) | (sensitive ? DONE_SENSITIVE : 0));
  return null;
}

/** Durable sleep `name` of `ms` milliseconds (0 continues at once, after a round trip through
 *  the host). Not recorded yet: reports it and never returns; the run after the wake continues
 *  past it. */
export function sleep(name: string, ms: i64): void {
  sleepImpl(name, ms, 0);
}

/** Durable sleep `name` until `unixMs` (milliseconds since the Unix epoch, e.g. now() + delay);
 *  a time in the past continues at once. */
export function sleepUntil(name: string, unixMs: i64): void {
  sleepImpl(name, unixMs, SLEEP_UNTIL);
}

function sleepImpl(name: string, ms: i64, flags: i32): void {
  if (currentStep !== null) fail("sleep(" + jsonQuote(name) + ") called inside a step function");
  reach();
  const nameBuf = utf8(name);
  if (entriesLeft > 0) {
    readEntry();
    if (entKind != KIND_SLEEP || !entryNameIs(nameBuf)) nondeterminism(OP_SLEEP, nameBuf);
    consumeEntry();
    return;
  }
  hostSleep(seq, changetype<usize>(nameBuf), nameBuf.byteLength, ms, flags);
  unreachable();
}

/** Waits (as `name`) for an event of `type` sent to this instance and returns its payload (JSON
 *  text). On timeout returns null and lastError() holds the timeout message. `timeoutMs` < 0
 *  means the host's default (24 hours). Not recorded yet: reports the wait; never returns. */
export function waitForEvent(name: string, type: string, timeoutMs: i64 = -1): string | null {
  if (currentStep !== null) fail("waitForEvent(" + jsonQuote(name) + ") called inside a step function");
  reach();
  const nameBuf = utf8(name);
  if (entriesLeft > 0) {
    readEntry();
    const kind = entKind;
    if ((kind != KIND_EVENT && kind != KIND_WAIT_TIMEOUT) || !entryNameIs(nameBuf)) {
      nondeterminism(OP_WAIT, nameBuf);
    }
    const value = entryValue();
    consumeEntry();
    if (kind == KIND_WAIT_TIMEOUT) {
      lastErr = value;
      return null;
    }
    lastErr = "";
    return value;
  }
  const typeBuf = utf8(type);
  hostWaitEvent(seq, changetype<usize>(nameBuf), nameBuf.byteLength,
    changetype<usize>(typeBuf), typeBuf.byteLength, timeoutMs);
  unreachable();
  return null;
}

/** The current time in milliseconds since the Unix epoch. Outside a step function it is
 *  recorded in the journal (replay gets the same value); inside one it is not. */
export function now(): i64 {
  if (currentStep !== null) return hostNow(seq);
  reach();
  if (entriesLeft > 0) {
    readEntry();
    const v = entKind == KIND_NOW ? entryDecimal() : -1;
    if (v < 0) nondeterminism(OP_NOW, utf8("now"));
    consumeEntry();
    return v;
  }
  const v = hostNow(seq);
  seq++;
  return v;
}

/** `len` (1 to RANDOM_MAX) random bytes. Outside a step function they are recorded in the
 *  journal (replay gets the same bytes); inside one they are not. Another len fails the instance
 *  (inside a step function: the step, without retry). */
export function random(len: i32): Uint8Array {
  if (len < 1 || len > RANDOM_MAX) {
    fail("random: len must be 1 to " + RANDOM_MAX.toString() + ", got " + len.toString());
  }
  const out = new Uint8Array(len);
  if (currentStep !== null) {
    hostRandom(seq, out.dataStart, len);
    return out;
  }
  reach();
  if (entriesLeft > 0) {
    readEntry();
    if (entKind != KIND_RANDOM || entValueLen != <u32>(2 * len) || !decodeHex(entValue, out)) {
      nondeterminism(OP_RANDOM, utf8("random"));
    }
    consumeEntry();
    return out;
  }
  hostRandom(seq, out.dataStart, len);
  seq++;
  return out;
}

/** random(len) as 2 × len lower-case hex digits. */
export function randomHex(len: i32): string {
  return toHex(random(len));
}

/** The attempt number (1 for the first) of the step function or rollback running now; 0 outside
 *  a step function. */
export function attempt(): i32 {
  return currentStep !== null ? stepAttempt : 0;
}

/** Message of the last failed step, timed-out wait or failed http() that was handed back as
 *  null; "" after one that returned a value. */
export function lastError(): string {
  return lastErr;
}

/** Fails the instance for good with `msg` (after its compensations run); never returns. Typed as
 *  string so a workflow can `return fail(msg)`. Inside a step function it fails the step without
 *  retry (better: return errorNoRetry(msg)). */
export function fail(msg: string): string {
  const text = msg.length ? msg : "workflow failed";
  const step = currentStep;
  if (step !== null) {
    const nameBuf = utf8(step);
    finishStep(nameBuf, errorNoRetry(text), 0);
  }
  reach();
  const b = utf8(text);
  hostFail(seq, changetype<usize>(b), b.byteLength);
  unreachable();
  return "";
}

/** Sends a log line at `level` (LOG_*). The host bounds lines per run and their length. */
export function log(level: i32, msg: string): void {
  logRaw(level, msg);
}

/** The instance id. Valid once the workflow has been called. */
export function instanceId(): string {
  return currentInstanceId;
}

/** The answer to an http() call: any status (a 3xx too: redirects are not followed). */
export class HttpResponse {
  constructor(
    public status: i32,
    /** The body as text. */
    public body: string,
    /** The whole answer as JSON: {"status":S,"headers":{...},"body":"text"}. */
    public json: string,
  ) {}

  /** The value of response header `name` (repeated headers joined with ", "), or null. */
  header(name: string): string | null {
    const headers = jsonRaw(this.json, "headers");
    return headers === null ? null : jsonStr(headers, name.toLowerCase());
  }
}

/** An HTTP call through the host's egress gateway; only inside a step or rollback function (the
 *  step's result is recorded, so the call is never repeated on replay); called from workflow
 *  code it fails the instance. `method`: GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS; `url`:
 *  http or https, its host on the tenant's egress allow list as written; `headersJson`: a JSON
 *  object of string values ("" for none); `body`: text, sent as UTF-8. A secret the operator
 *  configured for the host is added by the gateway and scrubbed from the answer.
 *  Returns the response, or null when there is none (refused, timed out, connection failed,
 *  over the per-step call limit, egress not configured, headersJson not an object of strings),
 *  with the message in lastError(). See docs/guest-abi.md, "Calling the outside world". */
export function http(
  method: string, url: string, headersJson: string = "", body: string = "",
): HttpResponse | null {
  if (currentStep === null) {
    fail("http(" + jsonQuote(url) + ") called outside a step function: HTTP calls must run inside a step");
    return null;
  }
  const headers = headersJson.length ? headersJson : "{}";
  const headersEnd = stringObjectEnd(headers);
  if (headersEnd < 0) {
    lastErr = "http: headersJson must be a JSON object of strings";
    return null;
  }
  const request = utf8("{\"method\":" + jsonQuote(method) + ",\"url\":" + jsonQuote(url) +
    ",\"headers\":" + headers.substring(0, headersEnd) + ",\"body\":" + jsonQuote(body) + "}");
  const n = hostHttpRequest(changetype<usize>(request), request.byteLength);
  if (n < 0) {
    lastErr = "http: the host refused the call";
    return null;
  }
  const answer = new ArrayBuffer(n);
  hostHttpResponse(changetype<usize>(answer), n);
  const json = String.UTF8.decode(answer);
  if (jsonRaw(json, "error") !== null) {
    const message = jsonStr(json, "error");
    lastErr = message !== null ? message : "http: the host's error is not a string";
    return null;
  }
  const status = jsonInt(json, "status", -1);
  if (status < 100 || status > 999) {
    lastErr = "http: the host's answer has no status";
    return null;
  }
  const text = jsonStr(json, "body");
  lastErr = "";
  return new HttpResponse(<i32>status, text !== null ? text : "", json);
}

/** Abort handler: build with --use abort=<this file>/stepfleetAbort. An abort inside a step
 *  function (an assertion, a bad index) fails that step, retryably, as a trap would; anywhere
 *  else it fails the instance, since deterministic workflow code would abort again on replay. */
export function stepfleetAbort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  let text = "abort: " + (message !== null ? message : "(no message)");
  if (fileName !== null) text += " at " + fileName + ":" + line.toString() + ":" + column.toString();
  const step = currentStep;
  if (step !== null) finishStep(utf8(step), error(text), 0);
  fail(text);
}

// ---- Hex ---------------------------------------------------------------------------------------

/** `bytes` as lower-case hex. */
export function toHex(bytes: Uint8Array): string {
  let hex = "";
  for (let i = 0; i < bytes.length; i++) {
    const b = <i32>bytes[i];
    hex += "0123456789abcdef".charAt(b >> 4) + "0123456789abcdef".charAt(b & 15);
  }
  return hex;
}

// Decodes out.length bytes from 2 × out.length lower-case hex digits at p; false if malformed.
function decodeHex(p: usize, out: Uint8Array): bool {
  for (let i = 0; i < out.length; i++) {
    const hi = lowerHexVal(<i32>load<u8>(p + 2 * i));
    const lo = lowerHexVal(<i32>load<u8>(p + 2 * i + 1));
    if (hi < 0 || lo < 0) return false;
    out[i] = <u8>((hi << 4) | lo);
  }
  return true;
}

function lowerHexVal(c: i32): i32 {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  return -1;
}

// ---- Minimal JSON helpers (top-level keys of an object; first occurrence wins) -----------------

function isWs(c: i32): bool {
  return c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d;
}

function skipWs(s: string, i: i32): i32 {
  while (i < s.length && isWs(s.charCodeAt(i))) i++;
  return i;
}

function hexVal(c: i32): i32 {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  return -1;
}

// Decodes the JSON string whose opening quote is at s[i]; sets strEnd past the closing quote.
// Returns null if malformed. UTF-16 escapes map straight onto AssemblyScript's UTF-16 strings.
let strEnd: i32 = 0;
function decodeStr(s: string, i: i32): string | null {
  if (i >= s.length || s.charCodeAt(i) != 0x22) return null;
  i++;
  let out = "";
  let runStart = i;
  while (true) {
    if (i >= s.length) return null;
    const c = s.charCodeAt(i);
    if (c == 0x22) break;
    if (c < 0x20) return null;
    if (c != 0x5c) {
      i++;
      continue;
    }
    out += s.substring(runStart, i);
    if (i + 1 >= s.length) return null;
    const e = s.charCodeAt(i + 1);
    i += 2;
    if (e == 0x22) out += "\"";
    else if (e == 0x5c) out += "\\";
    else if (e == 0x2f) out += "/";
    else if (e == 0x62) out += "\b";
    else if (e == 0x66) out += "\f";
    else if (e == 0x6e) out += "\n";
    else if (e == 0x72) out += "\r";
    else if (e == 0x74) out += "\t";
    else if (e == 0x75) {
      if (i + 4 > s.length) return null;
      let cp = 0;
      for (let k = 0; k < 4; k++) {
        const h = hexVal(s.charCodeAt(i + k));
        if (h < 0) return null;
        cp = (cp << 4) | h;
      }
      i += 4;
      out += String.fromCharCode(cp);
    } else return null;
    runStart = i;
  }
  out += s.substring(runStart, i);
  strEnd = i + 1;
  return out;
}

// Skips one value starting at s[i]; returns the index after it, or -1 if malformed. Containers
// are skipped by bracket depth, enough to find the next top-level key in valid JSON.
function skipValue(s: string, i: i32): i32 {
  let depth = 0;
  i = skipWs(s, i);
  const start = i;
  do {
    if (i >= s.length) return -1;
    const c = s.charCodeAt(i);
    if (c == 0x22) {
      if (decodeStr(s, i) === null) return -1;
      i = strEnd;
    } else if (c == 0x7b || c == 0x5b) {
      depth++;
      i++;
    } else if (c == 0x7d || c == 0x5d) {
      if (--depth < 0) return -1;
      i++;
    } else if (depth > 0) {
      i++;
    } else {
      while (i < s.length) {
        const d = s.charCodeAt(i);
        if (d == 0x2c || d == 0x7d || d == 0x5d || isWs(d)) break;
        i++;
      }
    }
  } while (depth > 0);
  return i == start ? -1 : i;
}

// Index of the value of top-level `key` in object `json`, or -1.
function findKey(json: string, key: string): i32 {
  let i = skipWs(json, 0);
  if (i >= json.length || json.charCodeAt(i) != 0x7b) return -1;
  i = skipWs(json, i + 1);
  if (i < json.length && json.charCodeAt(i) == 0x7d) return -1;
  while (true) {
    const k = decodeStr(json, i);
    if (k === null) return -1;
    i = skipWs(json, strEnd);
    if (i >= json.length || json.charCodeAt(i) != 0x3a) return -1;
    i = skipWs(json, i + 1);
    if (k == key) return i;
    i = skipValue(json, i);
    if (i < 0) return -1;
    i = skipWs(json, i);
    if (i >= json.length || json.charCodeAt(i) != 0x2c) return -1;
    i = skipWs(json, i + 1);
  }
  return -1;
}

// The index after the JSON object at the start of `s` if every value in it is a string; -1 if
// it is not such an object.
function stringObjectEnd(s: string): i32 {
  let i = skipWs(s, 0);
  if (i >= s.length || s.charCodeAt(i) != 0x7b) return -1;
  i = skipWs(s, i + 1);
  if (i < s.length && s.charCodeAt(i) == 0x7d) return i + 1;
  while (true) {
    if (decodeStr(s, i) === null) return -1;
    i = skipWs(s, strEnd);
    if (i >= s.length || s.charCodeAt(i) != 0x3a) return -1;
    i = skipWs(s, i + 1);
    if (decodeStr(s, i) === null) return -1;
    i = skipWs(s, strEnd);
    if (i >= s.length) return -1;
    const c = s.charCodeAt(i);
    if (c == 0x7d) return i + 1;
    if (c != 0x2c) return -1;
    i = skipWs(s, i + 1);
  }
  return -1;
}

/** The string value of top-level `key` in object `json`, unescaped; null if json is not an
 *  object, the key is missing, or the value is not a well-formed JSON string. */
export function jsonStr(json: string, key: string): string | null {
  const i = findKey(json, key);
  return i < 0 ? null : decodeStr(json, i);
}

/** The integer value of top-level `key` in object `json`, or `def` if missing, not a JSON
 *  integer (fractions and exponents count as not) or outside the i64 range. */
export function jsonInt(json: string, key: string, def: i64 = 0): i64 {
  let i = findKey(json, key);
  if (i < 0) return def;
  const neg = i < json.length && json.charCodeAt(i) == 0x2d;
  if (neg) i++;
  const first = i;
  let v: u64 = 0;
  const limit: u64 = neg ? <u64>i64.MAX_VALUE + 1 : <u64>i64.MAX_VALUE;
  while (i < json.length) {
    const c = json.charCodeAt(i);
    if (c < 0x30 || c > 0x39) break;
    const d = <u64>(c - 0x30);
    if (v > (limit - d) / 10) return def;
    v = v * 10 + d;
    i++;
  }
  if (i == first || (json.charCodeAt(first) == 0x30 && i - first > 1)) return def;
  if (i < json.length) {
    const c = json.charCodeAt(i);
    if (c == 0x2e || c == 0x65 || c == 0x45) return def;
  }
  return neg ? <i64>(0 - v) : <i64>v;
}

/** The raw JSON text of the value of top-level `key` in object `json` (e.g. `true`, `12`,
 *  `{"a":1}`, `"text"` with its quotes), or null if json is not an object or the key is missing. */
export function jsonRaw(json: string, key: string): string | null {
  const i = findKey(json, key);
  if (i < 0) return null;
  const e = skipValue(json, i);
  return e < 0 ? null : json.substring(i, e);
}

/** The boolean value of top-level `key` in object `json`, or `def` if missing or not true/false. */
export function jsonBool(json: string, key: string, def: bool = false): bool {
  const raw = jsonRaw(json, key);
  if (raw === null) return def;
  if (raw == "true") return true;
  if (raw == "false") return false;
  return def;
}

/** `s` as a quoted, escaped JSON string. */
export function jsonQuote(s: string): string {
  let out = "\"";
  let runStart = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let esc: string | null = null;
    if (c == 0x22) esc = "\\\"";
    else if (c == 0x5c) esc = "\\\\";
    else if (c == 0x0a) esc = "\\n";
    else if (c == 0x0d) esc = "\\r";
    else if (c == 0x09) esc = "\\t";
    else if (c == 0x08) esc = "\\b";
    else if (c == 0x0c) esc = "\\f";
    else if (c < 0x20) esc = "\\u00" + (c < 0x10 ? "0" : "1") + "0123456789abcdef".charAt(c & 15);
    if (esc !== null) {
      out += s.substring(runStart, i) + esc;
      runStart = i + 1;
    }
  }
  return out + s.substring(runStart) + "\"";
}
