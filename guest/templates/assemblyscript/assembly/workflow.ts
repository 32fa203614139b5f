// A stepfleet workflow: one step that greets the "name" in the params, then completes with it.
// Build: npm run build (writes build/workflow.wasm). Try it: stepfleet run build/workflow.wasm.

import { run, stepDo, ok, fail, lastError, jsonStr, jsonQuote, Outcome } from "stepfleet-guest-sdk/assembly/index";
export { sf_abi_version, sf_alloc } from "stepfleet-guest-sdk/assembly/index";

export function sf_run(ptr: usize, len: usize): void {
  run(ptr, len, workflow);
}

// Step functions are top-level functions: the SDK keeps a reference to them, and AssemblyScript
// has no closures, so a step function cannot capture the workflow's local variables. Give a
// step what it needs through its input (a JSON string) instead.
function greet(input: string): Outcome {
  const name = jsonStr(input, "name");
  return ok("{\"greeting\":" + jsonQuote("Hello, " + (name !== null ? name : "world")) + "}");
}

function workflow(params: string): string {
  const greeting = stepDo("greet", greet, params);
  if (greeting === null) return fail("greet failed: " + lastError());
  return greeting;
}
