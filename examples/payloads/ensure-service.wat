;; Ensure a service is running and enabled at boot.
;;
;; Bundle artifact: ensure-service.sh. Envelope argument 0: the service name.
;; Capabilities: run-artifact, log.
(module
  (import "tenet" "arg" (func $arg (param i32 i32 i32) (result i32)))
  (import "tenet" "log" (func $log (param i32 i32)))
  (import "tenet" "run_artifact" (func $run_artifact (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ensure-service.sh")
  (data (i32.const 32) "starting the service")
  (func (export "run") (result i32)
    (local $len i32)
    (local.set $len (call $arg (i32.const 0) (i32.const 256) (i32.const 256)))
    (if (i32.lt_s (local.get $len) (i32.const 1)) (then (return (i32.const 64))))
    (if (i32.gt_s (local.get $len) (i32.const 256)) (then (return (i32.const 65))))
    (call $log (i32.const 32) (i32.const 20))
    (call $run_artifact (i32.const 0) (i32.const 17) (i32.const 256) (local.get $len))))
