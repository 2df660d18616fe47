;; The standard library payload: runs tenet-std.sh with the envelope's
;; arguments, the steps Tenet computed from a policy's requirements
;; (`remediation: {auto: {}}`; see tenet-std.sh and protocol/src/stdlib.rs).
;;
;; Bundle artifacts: tenet-std.sh, install-deb.sh, and what the steps need
;; (.debs, file contents). Capabilities: run-artifact, log.
;; Exit code: the script's; 64 when no argument was given, 65 when they
;; are too long.
(module
  (import "tenet" "arg_count" (func $arg_count (result i32)))
  (import "tenet" "arg" (func $arg (param i32 i32 i32) (result i32)))
  (import "tenet" "log" (func $log (param i32 i32)))
  (import "tenet" "run_artifact" (func $run_artifact (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "tenet-std.sh")
  (data (i32.const 32) "running the standard library steps")
  (func (export "run") (result i32)
    (local $i i32)
    (local $count i32)
    (local $at i32)
    (local $len i32)
    (local.set $count (call $arg_count))
    (if (i32.lt_s (local.get $count) (i32.const 1)) (then (return (i32.const 64))))
    ;; The steps from offset 256, each ended by a 0 byte (how run_artifact
    ;; takes several arguments), within the 64 KiB page.
    (local.set $at (i32.const 256))
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        (local.set $len
          (call $arg (local.get $i) (local.get $at) (i32.sub (i32.const 65535) (local.get $at))))
        (if (i32.lt_s (local.get $len) (i32.const 1)) (then (return (i32.const 64))))
        (if (i32.ge_s (i32.add (local.get $at) (local.get $len)) (i32.const 65535))
          (then (return (i32.const 65))))
        (local.set $at (i32.add (local.get $at) (local.get $len)))
        (i32.store8 (local.get $at) (i32.const 0))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $log (i32.const 32) (i32.const 34))
    (call $run_artifact
      (i32.const 0) (i32.const 12)
      (i32.const 256) (i32.sub (local.get $at) (i32.const 256)))))
