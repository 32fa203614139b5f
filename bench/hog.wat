;; A CPU hog for bench/fairness.py --hog: its one step spins until the run's fuel (CPU budget)
;; runs out, so every attempt fails with "CPU limit exceeded" and is retried at once (no delay)
;; up to 1,000 times. A handful of instances keep a steady stream of full-budget runs.
(module
  (import "stepfleet" "step_begin" (func $step_begin (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 16) "spin")
  (data (i32.const 64) "{\"retries\": {\"limit\": 1000, \"delay_ms\": 0}}")
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
    (drop (call $step_begin (call $entry_count (local.get $ptr)) (i32.const 16) (i32.const 4)
      (i32.const 64) (i32.const 43)))
    (loop $spin (br $spin))))
