;; The smallest payload: runs and exits 0. Used by the protocol round trip
;; in the README and by tests. The host API (run an artifact, read the
;; inventory, write files, log) comes with the agent.
(module
  (func (export "run") (result i32)
    i32.const 0))
