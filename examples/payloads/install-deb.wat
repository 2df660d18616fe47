;; Install a package from a .deb shipped in the bundle.
;;
;; Bundle artifacts: install-deb.sh (the installer, run as its own process)
;; and the .deb itself. Envelope argument 0: the .deb's file name.
;; Capabilities: run-artifact, log.
;; Exit code: the installer's (0 when dpkg installed the package);
;; 64 when no argument was given, 65 when it is too long.
(module
  (import "tenet" "arg" (func $arg (param i32 i32 i32) (result i32)))
  (import "tenet" "log" (func $log (param i32 i32)))
  (import "tenet" "run_artifact" (func $run_artifact (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "install-deb.sh")
  (data (i32.const 32) "installing the bundled package")
  (func (export "run") (result i32)
    (local $len i32)
    ;; Argument 0 (the .deb's name) at offset 256, at most 1024 bytes.
    (local.set $len (call $arg (i32.const 0) (i32.const 256) (i32.const 1024)))
    (if (i32.lt_s (local.get $len) (i32.const 1)) (then (return (i32.const 64))))
    (if (i32.gt_s (local.get $len) (i32.const 1024)) (then (return (i32.const 65))))
    (call $log (i32.const 32) (i32.const 30))
    (call $run_artifact (i32.const 0) (i32.const 14) (i32.const 256) (local.get $len))))
