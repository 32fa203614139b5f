;; Hostile: begins a new step "huge" (step_begin, default config) and reports its result, valid
;; JSON (a string literal) of exactly 4 MiB, over the 1 MiB result cap. Expected: the step fails
;; naming the output size limit and nothing is recorded.
(module
  (import "stepfleet" "step_begin" (func $step_begin (param i32 i32 i32 i32 i32) (result i32)))
  (import "stepfleet" "step_done" (func $step_done (param i32 i32 i32 i32 i32 i32)))
  ;; Result at [64 KiB, 64 KiB + 4 MiB); the replay buffer goes after it.
  (memory (export "memory") 66)
  (global $heap (mut i32) (i32.const 4259840))
  (data (i32.const 16) "huge")
  (func (export "sf_abi_version") (result i32) (i32.const 2))
  ;; Bump allocator for the replay buffer; grows memory as needed, 0 when it cannot.
  (func (export "sf_alloc") (param $len i32) (result i32)
    (local $p i32) (local $end i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $len)))
    (if (i32.lt_u (local.get $end) (local.get $p)) (then (return (i32.const 0))))
    (if (i32.gt_u (local.get $end) (i32.shl (memory.size) (i32.const 16)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16))
                                    (memory.size)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (i32.and (i32.add (local.get $end) (i32.const 7)) (i32.const -8)))
    (local.get $p))
  ;; Journal length: the replay buffer's entry_count, after the header (abi_version, mode,
  ;; attempt), instance id and params.
  (func $entry_count (param $p i32) (result i32)
    (local.set $p (i32.add (local.get $p) (i32.const 12)))
    (local.set $p (i32.add (i32.add (local.get $p) (i32.const 4)) (i32.load (local.get $p))))
    (local.set $p (i32.add (i32.add (local.get $p) (i32.const 4)) (i32.load (local.get $p))))
    (i32.load (local.get $p)))
  (func (export "sf_run") (param $ptr i32) (param $len i32)
    (local $seq i32)
    (local.set $seq (call $entry_count (local.get $ptr)))
    (drop (call $step_begin (local.get $seq) (i32.const 16) (i32.const 4) (i32.const 0) (i32.const 0)))
    (i32.store8 (i32.const 65536) (i32.const 0x22))
    (memory.fill (i32.const 65537) (i32.const 0x61) (i32.const 4194302))
    (i32.store8 (i32.const 4259839) (i32.const 0x22))
    (call $step_done (local.get $seq)
      (i32.const 16) (i32.const 4) (i32.const 65536) (i32.const 4194304) (i32.const 0))
    unreachable))
