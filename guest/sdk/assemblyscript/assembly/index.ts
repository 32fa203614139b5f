// stepfleet guest SDK for AssemblyScript (guest ABI version 1). Contract: docs/guest-abi.md.
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
// Replay: stepDo answers steps recorded in the journal without calling the host, runs the first
// unrecorded step and reports it (the host then stops the guest). Returning from the workflow
// completes the instance. Workflow code must be deterministic in which steps it asks for;
// nondeterministic work belongs inside step functions, whose results are recorded.

// ---- Host imports ------------------------------------------------------------------------------

@external("stepfleet", "step_done")
declare function hostStepDo(seq: i32, namePtr: usize, nameLen: i32, resultPtr: usize, resultLen: i32): void;
@external("stepfleet", "step_failed")
declare function hostStepFailed(seq: i32, namePtr: usize, nameLen: i32, msgPtr: usize, msgLen: i32, flags: i32): void;
@external("stepfleet", "complete")
declare function hostComplete(seq: i32, outputPtr: usize, outputLen: i32): void;
@external("stepfleet", "fail")
declare function hostFail(seq: i32, msgPtr: usize, msgLen: i32): void;
@external("stepfleet", "nondeterminism")
declare function hostNondeterminism(seq: i32, op: i32, namePtr: usize, nameLen: i32): void;
@external("stepfleet", "log")
declare function hostLog(level: i32, msgPtr: usize, msgLen: i32): void;

// ---- Public constants and types ----------------------------------------------------------------

/** The guest ABI version this SDK speaks. */
export const ABI_VERSION: i32 = 1;

/** Log levels for log(). */
export const LOG_DEBUG: i32 = 0;
export const LOG_INFO: i32 = 1;
export const LOG_WARN: i32 = 2;
export const LOG_ERROR: i32 = 3;

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

/** A step function: gets its input, returns an Outcome. */
export type StepFn = (input: string) => Outcome;

/** A workflow: gets the params (JSON text), returns the output (JSON text) or `return fail(msg)`. */
export type WorkflowFn = (params: string) => string;

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

const KIND_STEP_OK: u8 = 1;
const KIND_STEP_FAILED: u8 = 2;
const OP_STEP: i32 = 1;

let cur: usize = 0; // unread part of the replay buffer: [cur, end)
let end: usize = 0;
let entriesLeft: u32 = 0; // journal entries not replayed yet
let seq: i32 = 0; // journal position reached
let currentInstanceId: string = "";
let lastErr: string = "";
let currentStep: string | null = null; // name of the step function running, if any

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
  if (readU32() != <u32>ABI_VERSION) corrupt("replay buffer ABI version is not 1");
  currentInstanceId = readString();
  const params = readString();
  entriesLeft = readU32();
  seq = 0;
  const out = utf8(workflow(params));
  hostComplete(seq, changetype<usize>(out), out.byteLength);
  unreachable(); // a terminal import returned: the host broke the contract
}

// ---- Workflow API ------------------------------------------------------------------------------

/** Runs step `name` at the current journal position.
 *  Recorded success: returns the recorded result (JSON text) without running fn.
 *  Recorded failure: returns null; lastError() gives the recorded message.
 *  Not recorded yet: runs fn(input) and reports the outcome to the host; never returns.
 *  A recorded entry with another name or an unknown kind reports nondeterminism; never returns.
 *  Must not be called from inside a step function. */
export function stepDo(name: string, fn: StepFn, input: string = ""): string | null {
  if (currentStep !== null) fail("stepDo called inside a step function");
  const nameBuf = utf8(name);
  const nameLen = nameBuf.byteLength;

  if (entriesLeft > 0) {
    if (cur >= end) corrupt("replay buffer truncated");
    const kind = load<u8>(cur);
    cur += 1;
    if (kind != KIND_STEP_OK && kind != KIND_STEP_FAILED) {
      hostNondeterminism(seq, OP_STEP, changetype<usize>(nameBuf), nameLen);
      unreachable();
    }
    const recName = readBytes();
    const recNameLen = readLen;
    const value = readString();
    if (<u32>nameLen != recNameLen || memory.compare(recName, changetype<usize>(nameBuf), nameLen) != 0) {
      hostNondeterminism(seq, OP_STEP, changetype<usize>(nameBuf), nameLen);
      unreachable();
    }
    seq++;
    entriesLeft--;
    if (kind == KIND_STEP_FAILED) {
      lastErr = value;
      return null;
    }
    lastErr = "";
    return value;
  }

  currentStep = name;
  const o = fn(input);
  currentStep = null;
  if (o.succeeded) {
    const res = utf8(o.value.length ? o.value : "null");
    hostStepDo(seq, changetype<usize>(nameBuf), nameLen, changetype<usize>(res), res.byteLength);
  } else {
    const msg = utf8(o.value.length ? o.value : "step failed");
    hostStepFailed(seq, changetype<usize>(nameBuf), nameLen, changetype<usize>(msg), msg.byteLength, o.retry ? 0 : 1);
  }
  unreachable();
  return null;
}

/** Message of the last step that stepDo answered as failed; "" after a successful step. */
export function lastError(): string {
  return lastErr;
}

/** Fails the instance for good with `msg`; never returns. Typed as string so a workflow can
 *  `return fail(msg)`. Inside a step function return errorNoRetry(msg) instead. */
export function fail(msg: string): string {
  const b = utf8(msg.length ? msg : "workflow failed");
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

/** Abort handler: build with --use abort=<this file>/stepfleetAbort. An abort inside a step
 *  function (an assertion, a bad index) fails that step, retryably, as a trap would; anywhere
 *  else it fails the instance, since deterministic workflow code would abort again on replay. */
export function stepfleetAbort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  let text = "abort: " + (message !== null ? message : "(no message)");
  if (fileName !== null) text += " at " + fileName + ":" + line.toString() + ":" + column.toString();
  const step = currentStep;
  if (step !== null) {
    const nameBuf = utf8(step);
    const msg = utf8(text);
    hostStepFailed(seq, changetype<usize>(nameBuf), nameBuf.byteLength, changetype<usize>(msg), msg.byteLength, 0);
    unreachable();
  }
  fail(text);
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
