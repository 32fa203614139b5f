// Greeter workflow: look up a greeting for the language, compose the message, deliver it.
// See README.md for params and output.
//
// Test hook: params "fail_at" names a step ("lookup", "compose" or "deliver") that then fails
// without retry; the workflow then fails with "<step> failed: <message>".

import {
  run, stepDo, ok, errorNoRetry, fail, lastError, log, jsonStr, jsonQuote, Outcome, LOG_INFO,
} from "../../sdk/assemblyscript/assembly/index";
export { sf_abi_version, sf_alloc } from "../../sdk/assemblyscript/assembly/index";

export function sf_run(ptr: usize, len: usize): void {
  run(ptr, len, workflow);
}

// Step functions see only their input; the failure hook needs the params, constant for the run.
let params: string = "";

function injected(step: string): bool {
  const at = jsonStr(params, "fail_at");
  return at !== null && at == step;
}

// A stable stand-in for a delivery receipt: FNV-1a over the UTF-8 message, 8 hex digits.
function receiptOf(message: string): string {
  const bytes = Uint8Array.wrap(String.UTF8.encode(message));
  let h: u32 = 2166136261;
  for (let i = 0; i < bytes.length; i++) h = (h ^ <u32>bytes[i]) * 16777619;
  let hex = "";
  for (let shift = 28; shift >= 0; shift -= 4) hex += "0123456789abcdef".charAt((h >>> shift) & 15);
  return "RCPT-" + hex;
}

// input: params. result: {"greeting":"Hello","lang":"en"}
function lookup(input: string): Outcome {
  const lang = jsonStr(input, "lang");
  const code = lang !== null ? lang : "en";
  if (injected("lookup")) return errorNoRetry("greeting service unavailable");
  let greeting: string;
  if (code == "en") greeting = "Hello";
  else if (code == "fr") greeting = "Bonjour";
  else if (code == "de") greeting = "Hallo";
  else if (code == "es") greeting = "Hola";
  else return errorNoRetry("unsupported language " + jsonQuote(code));
  return ok("{\"greeting\":" + jsonQuote(greeting) + ",\"lang\":" + jsonQuote(code) + "}");
}

// input: {"greeting","name"}. result: {"message":"Hello, Ada!"}
function compose(input: string): Outcome {
  if (injected("compose")) return errorNoRetry("template error");
  const greeting = jsonStr(input, "greeting");
  const name = jsonStr(input, "name");
  const message = (greeting !== null ? greeting : "Hello") + ", " + (name !== null ? name : "friend") + "!";
  return ok("{\"message\":" + jsonQuote(message) + "}");
}

// input: {"message"}. result: {"receipt":"RCPT-...","chars":11}
function deliver(input: string): Outcome {
  if (injected("deliver")) return errorNoRetry("mailbox full");
  const message = jsonStr(input, "message");
  const text = message !== null ? message : "";
  log(LOG_INFO, "delivering " + jsonQuote(text));
  return ok("{\"receipt\":" + jsonQuote(receiptOf(text)) + ",\"chars\":" + text.length.toString() + "}");
}

function workflow(p: string): string {
  params = p;
  const name = jsonStr(p, "name");
  if (name === null || name.length == 0) return fail("params.name must be a non-empty string");

  const l = stepDo("lookup", lookup, p);
  if (l === null) return fail("lookup failed: " + lastError());
  const greeting = jsonStr(l, "greeting");
  const lang = jsonStr(l, "lang");

  const c = stepDo("compose", compose,
    "{\"greeting\":" + jsonQuote(greeting !== null ? greeting : "") + ",\"name\":" + jsonQuote(name) + "}");
  if (c === null) return fail("compose failed: " + lastError());
  const message = jsonStr(c, "message");
  const text = message !== null ? message : "";

  const d = stepDo("deliver", deliver, "{\"message\":" + jsonQuote(text) + "}");
  if (d === null) return fail("deliver failed: " + lastError());
  const receipt = jsonStr(d, "receipt");

  return "{\"message\":" + jsonQuote(text) +
    ",\"lang\":" + jsonQuote(lang !== null ? lang : "") +
    ",\"receipt\":" + jsonQuote(receipt !== null ? receipt : "") + "}";
}
