;; Remove packages that must be absent.
;;
;; Bundle artifact: remove-packages.sh. Envelope arguments: the package names.
;; Capabilities: run-artifact, log.
;; Exit code: the remover's; 64 for a bad argument, 65 when they are too long.
(module
  (import "tenet" "arg_count" (func $arg_count (result i32)))
  (import "tenet" "arg" (func $arg (param i32 i32 i32) (result i32)))
  (import "tenet" "log" (func $log (param i32 i32)))
  (import "tenet" "run_artifact" (func $run_artifact (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "remove-packages.sh")
  (data (i32.const 32) "removing packages")
  (func (export "run") (result i32)
    (local $i i32) (local $n i32) (local $off i32) (local $len i32)
    (local.set $n (call $arg_count))
    (local.set $off (i32.const 1024))
    ;; Arguments one after the other from offset 1024, each ended by a NUL.
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $n)))
        (if (i32.gt_s (local.get $off) (i32.const 60000)) (then (return (i32.const 65))))
        (local.set $len (call $arg (local.get $i) (local.get $off) (i32.const 4096)))
        (if (i32.lt_s (local.get $len) (i32.const 0)) (then (return (i32.const 64))))
        (if (i32.gt_s (local.get $len) (i32.const 4096)) (then (return (i32.const 65))))
        (local.set $off (i32.add (local.get $off) (local.get $len)))
        (i32.store8 (local.get $off) (i32.const 0))
        (local.set $off (i32.add (local.get $off) (i32.const 1)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $log (i32.const 32) (i32.const 17))
    (call $run_artifact (i32.const 0) (i32.const 18) (i32.const 1024)
      (i32.sub (local.get $off) (i32.const 1024)))))
