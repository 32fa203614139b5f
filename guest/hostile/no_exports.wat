;; Hostile: a valid module that exports none of the ABI (no memory, sf_abi_version, sf_alloc or
;; sf_run). Expected: refused when pushed, naming the missing exports.
(module
  (memory 1)
  (func $main (result i32) (i32.const 42))
  (export "main" (func $main)))
