//! CEL as Tenet uses it: one shared environment, the variables a terminal
//! exposes to expressions, the functions Tenet adds (version comparison),
//! and the check that rejects expressions that cannot work before they are
//! ever run on a terminal.
//!
//! Variables: `terminal` (name), `labels` (map: the labels admins assigned
//! the terminal), `claims` (what the terminal says of itself: `labels`, the
//! labels it reports, and `facts`, a map of `os`, `site`, `hardware`,
//! `extra`), `inventory` (the whole inventory: `packages`, `services`,
//! `files` as lists of maps) and `packages` (map of fully installed package name
//! to version).
//!
//! Functions: `dpkgCompare(a, b)` and `semverCompare(a, b)` return -1, 0 or 1,
//! because CEL compares strings as strings (`"9.0" > "120.0"`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, OnceLock};

use cel::common::types::{CelMap, CelMapKey, CelNull as NullVal, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, ExecutionError, Program, Value};
use tenet_protocol::inventory::Inventory;

use super::version::{compare_dpkg, compare_semver};

/// The names an expression may refer to.
pub const VARIABLES: [&str; 5] = ["terminal", "labels", "claims", "inventory", "packages"];

static ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// A compiled CEL expression with its source, compiled once per policy
/// generation.
#[derive(Debug, Clone)]
pub struct Expression {
    pub source: String,
    program: Arc<Program>,
}

/// Why an expression is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CelError {
    #[error("CEL syntax error at column {column}: {message}")]
    Syntax { column: usize, message: String },
    #[error("CEL type error: {0}")]
    Type(String),
    #[error("CEL expression must be a bool, but it gives {0}")]
    NotBool(String),
}

impl Expression {
    /// Compile `source` and check it against sample terminals, so that
    /// misspelt variables, type errors and non-bool results are refused when
    /// the policy is loaded rather than on every terminal.
    pub fn compile(source: &str) -> Result<Expression, CelError> {
        let program = ENV.compile(source).map_err(|errors| {
            let first = errors.errors.first();
            CelError::Syntax {
                column: first.map_or(1, |e| usize::try_from(e.pos.1).unwrap_or(0) + 1),
                message: first.map_or_else(|| errors.to_string(), |e| e.msg.clone()),
            }
        })?;
        let expr = Expression {
            source: source.to_string(),
            program: Arc::new(program),
        };
        for sample in samples() {
            let vars = TerminalVars::new(sample, &sample.labels);
            match expr.evaluate(&vars) {
                Ok(Value::Bool(_)) => {}
                Ok(other) => return Err(CelError::NotBool(type_name(&other).to_string())),
                Err(e) if is_type_error(&e) => return Err(CelError::Type(describe(&e))),
                // Missing keys, out-of-range indexes and the like depend on
                // the terminal: they are runtime results, not policy errors.
                Err(_) => {}
            }
        }
        Ok(expr)
    }

    pub fn evaluate(&self, vars: &TerminalVars<'_>) -> Result<Value, ExecutionError> {
        let root: &Context<'_, '_> = &ROOT;
        let mut scope = root.new_inner_scope();
        scope.set_variable_resolver(vars);
        self.program.execute(&scope)
    }

    /// Evaluate to a bool; an error or a non-bool is a readable reason.
    pub fn evaluate_bool(&self, vars: &TerminalVars<'_>) -> Result<bool, String> {
        match self.evaluate(vars) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("gave {} instead of a bool", type_name(&other))),
            Err(e) => Err(describe(&e)),
        }
    }
}

/// The CEL variables of one terminal. Each is built on first use and then
/// shared by every expression evaluated against this terminal: a terminal
/// with 1,500 packages pays for the `packages` map only when a policy reads
/// it.
pub struct TerminalVars<'a> {
    inventory: &'a Inventory,
    /// The labels admins assigned it.
    assigned: &'a BTreeMap<String, String>,
    built: [OnceLock<Box<dyn Val + 'a>>; VARIABLES.len()],
}

/// What a terminal claims about itself, as CEL sees it (`claims.*`).
#[derive(serde::Serialize)]
struct Claims<'a> {
    labels: &'a BTreeMap<String, String>,
    facts: &'a tenet_protocol::inventory::Facts,
}

impl<'a> TerminalVars<'a> {
    pub fn new(
        inventory: &'a Inventory,
        assigned: &'a BTreeMap<String, String>,
    ) -> TerminalVars<'a> {
        TerminalVars {
            inventory,
            assigned,
            built: Default::default(),
        }
    }

    fn build(&self, index: usize) -> Box<dyn Val + 'a> {
        let inv = self.inventory;
        let value = match VARIABLES[index] {
            "terminal" => Value::from(inv.terminal.clone()),
            "labels" => to_cel(self.assigned),
            "claims" => to_cel(&Claims {
                labels: &inv.labels,
                facts: &inv.facts,
            }),
            "inventory" => to_cel(inv),
            _ => {
                // The largest variable on a real terminal (thousands of
                // packages): borrow names and versions, copy nothing.
                // Only what is fully installed: an unpacked or
                // half-configured package is not there for a policy.
                let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = inv
                    .packages
                    .iter()
                    .filter(|p| p.is_installed())
                    .map(|p| {
                        let version: Box<dyn Val + 'a> =
                            Box::new(CelString::from(p.version.as_str()));
                        (CelMapKey::String(CelString::from(p.name.as_str())), version)
                    })
                    .collect();
                return Box::new(CelMap::from(map));
            }
        };
        // Plain data always converts; null stands in for the impossible.
        Box::<dyn Val>::try_from(value).unwrap_or_else(|_| Box::new(NullVal))
    }
}

impl VariableResolver for TerminalVars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let index = VARIABLES.iter().position(|v| *v == variable)?;
        let val = self.built[index].get_or_init(|| self.build(index));
        Some(CowVal::Borrowed(val.as_ref()))
    }
}

/// The functions Tenet adds, registered once per process.
static ROOT: LazyLock<Context<'static, 'static>> = LazyLock::new(|| {
    let mut root = Context::with_env(ENV.clone());
    register_functions(&mut root);
    root
});

/// Inventory data as CEL values. Numbers become CEL `int` (not `uint`), so
/// that `claims.facts.hardware.memoryMib >= 4096` works as people write it.
fn to_cel<T: serde::Serialize>(value: &T) -> Value {
    fn convert(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::from(s),
            serde_json::Value::Array(items) => {
                Value::List(Arc::new(items.into_iter().map(convert).collect()))
            }
            serde_json::Value::Object(map) => {
                let map: HashMap<String, Value> =
                    map.into_iter().map(|(k, v)| (k, convert(v))).collect();
                Value::from(map)
            }
        }
    }
    // The inventory types always serialise (plain structs, string keys).
    convert(serde_json::to_value(value).unwrap_or(serde_json::Value::Null))
}

fn register_functions(ctx: &mut Context<'static, 'static>) {
    fn ordering(
        name: &'static str,
        cmp: fn(&str, &str) -> Option<std::cmp::Ordering>,
    ) -> impl Fn(Arc<String>, Arc<String>) -> Result<Value, ExecutionError> + Send + Sync + 'static
    {
        move |a: Arc<String>, b: Arc<String>| match cmp(&a, &b) {
            Some(o) => Ok(Value::Int(o as i64)),
            None => Err(ExecutionError::function_error(
                name,
                format!("cannot compare {a:?} with {b:?}: not valid versions"),
            )),
        }
    }
    // Both names are Tenet's own, so they cannot collide with the standard
    // library; a collision would be a programming error caught by the tests.
    let _ = ctx.add_function("dpkgCompare", ordering("dpkgCompare", compare_dpkg));
    let _ = ctx.add_function("semverCompare", ordering("semverCompare", compare_semver));
}

fn is_type_error(e: &ExecutionError) -> bool {
    matches!(
        e,
        ExecutionError::NoSuchOverload(_)
            | ExecutionError::UnsupportedBinaryOperator(..)
            | ExecutionError::ValuesNotComparable(..)
            | ExecutionError::UnexpectedType { .. }
            | ExecutionError::UnsupportedTargetType { .. }
            | ExecutionError::NotSupportedAsMethod { .. }
            | ExecutionError::UnsupportedKeyType(_)
            | ExecutionError::UnsupportedIndex(..)
            | ExecutionError::InvalidArgumentCount { .. }
            | ExecutionError::UndeclaredReference(_)
    )
}

/// A one-line description of an evaluation error, without Rust debug
/// noise where a better word exists.
fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::UndeclaredReference(name) if name.as_str() == "facts" => {
            "unknown name 'facts': what a terminal reports about itself is claims.facts (and its own labels claims.labels; labels are those admins assigned)".to_string()
        }
        ExecutionError::UndeclaredReference(name) => format!(
            "unknown name '{name}' (the variables are {})",
            VARIABLES.join(", ")
        ),
        ExecutionError::NoSuchKey(key) => format!("no such key '{key}'"),
        ExecutionError::ValuesNotComparable(a, b) => {
            format!("cannot compare {} with {}", type_name(a), type_name(b))
        }
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => format!(
            "operator '{op}' does not apply to {} and {}",
            type_name(a),
            type_name(b)
        ),
        other => other.to_string(),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "list",
        Value::Map(_) => "map",
        Value::Int(_) => "int",
        Value::UInt(_) => "uint",
        Value::Float(_) => "double",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        _ => "value",
    }
}

/// Terminals an expression is tried on when it is compiled: one with
/// nothing, one with a little of everything.
fn samples() -> &'static [Inventory] {
    static SAMPLES: LazyLock<Vec<Inventory>> = LazyLock::new(|| {
        use tenet_protocol::inventory::*;
        let full = Inventory {
            terminal: "sample".into(),
            labels: [("site".to_string(), "sample".to_string())].into(),
            facts: Facts {
                os: OsFacts {
                    family: "debian".into(),
                    distribution: "debian".into(),
                    version: "12".into(),
                    kernel: "6.1.0".into(),
                    architecture: "amd64".into(),
                },
                site: Some("sample".into()),
                hardware: HardwareFacts {
                    model: "sample".into(),
                    cpu_cores: 4,
                    memory_mib: 8192,
                    tpm: true,
                },
                security: SecurityFacts {
                    disk_encrypted: Some(true),
                    firewall: Some(true),
                },
                extra: [("sample".to_string(), "sample".to_string())].into(),
            },
            packages: vec![Package::installed("sample", "1.0-1", PackageManager::Dpkg)],
            services: vec![Service {
                name: "sample".into(),
                state: ServiceState::Running,
                enabled: true,
            }],
            files: vec![FileEntry {
                path: "/sample".into(),
                sha256: "0".repeat(64),
                size: 1,
            }],
        };
        vec![Inventory::default(), full]
    });
    &SAMPLES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_refuses_what_cannot_work() {
        assert!(matches!(
            Expression::compile("1 +"),
            Err(CelError::Syntax { .. })
        ));
        assert_eq!(
            Expression::compile("claims.facts.hardware.memoryMib > '4096'").err(),
            Some(CelError::Type(
                "found no matching overload for '_>_' applied to '(int, string)'".into()
            ))
        );
        assert_eq!(
            Expression::compile("size(packages)").err(),
            Some(CelError::NotBool("int".into()))
        );
        assert!(
            matches!(Expression::compile("nope == 1"), Err(CelError::Type(m)) if m.contains("unknown name 'nope'"))
        );
        // A key that a terminal may lack is a runtime matter, not an error.
        assert!(Expression::compile("labels.site == 'nagoya'").is_ok());
        // What a terminal reports about itself is a claim, and named so.
        assert!(Expression::compile("claims.labels.site == 'nagoya'").is_ok());
        assert_eq!(
            Expression::compile("facts.hardware.tpm").err(),
            Some(CelError::Type(
                "unknown name 'facts': what a terminal reports about itself is claims.facts (and its own labels claims.labels; labels are those admins assigned)".into()
            ))
        );
    }

    #[test]
    fn labels_are_what_admins_assigned_and_claims_what_the_terminal_says() {
        let inv = Inventory {
            labels: [("site".to_string(), "nagoya".to_string())].into(),
            ..Inventory::default()
        };
        let assigned = [("site".to_string(), "osaka".to_string())].into();
        let vars = TerminalVars::new(&inv, &assigned);
        let eval = |src: &str| {
            Expression::compile(src)
                .expect("compiles")
                .evaluate_bool(&vars)
        };
        assert_eq!(eval("labels.site == 'osaka'"), Ok(true));
        assert_eq!(eval("claims.labels.site == 'nagoya'"), Ok(true));
    }

    #[test]
    fn version_functions_compare_as_versions() {
        let inv = Inventory::default();
        let none = BTreeMap::new();
        let vars = TerminalVars::new(&inv, &none);
        let eval = |src: &str| {
            Expression::compile(src)
                .expect("compiles")
                .evaluate_bool(&vars)
        };
        assert_eq!(eval("dpkgCompare('9.0', '120.0') < 0"), Ok(true));
        assert_eq!(
            eval("'9.0' > '120.0'"),
            Ok(true),
            "CEL alone compares strings"
        );
        assert_eq!(eval("semverCompare('1.10.0', '1.9') > 0"), Ok(true));
        assert_eq!(
            eval("dpkgCompare('x', '1') == 0"),
            Err("Error executing function 'dpkgCompare': cannot compare \"x\" with \"1\": not valid versions".into())
        );
    }
}
