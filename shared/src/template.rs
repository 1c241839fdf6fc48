//! Workflow templates: parsing, defaults and validation.
//!
//! A template arrives as YAML (JSON is accepted, being YAML too) or as a JSON
//! value from an API body. Either way it is read into private `Raw*` structs
//! that refuse unknown keys, the layered defaults are resolved, and every rule
//! is checked before a [`Template`] exists: holding one means it is valid.
//! Each refusal is a [`TemplateError`] whose `path` names the offending field
//! (`steps[2].retry.max_attempts`), so an author knows which line to change.
//!
//! [`Template::definition`] is the canonical, fully resolved JSON form stored
//! in the database; [`Template::from_definition`] reads it back and applies the
//! same rules, because a stored row is input too.
//!
//! All input is read through `serde_norway::Value`, not `serde_json::Value`:
//! serde_json would fill a struct from an array by position, the YAML value
//! refuses to. Its parser also refuses duplicate keys, nesting deeper than 128
//! levels and aliases that expand without bound.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::names::{HandlerName, Namespace, StepName, TemplateName};
use crate::state::OnFailure;

/// The most steps one template may declare. Every task copies its template's
/// steps into rows, so the limit bounds the work a single request can cause.
pub const MAX_STEPS: usize = 5_000;

const MAX_DESCRIPTION_CHARS: usize = 1_000;
const MAX_ATTEMPTS: i64 = 100;
/// Upper bound for step timeouts and retry delays: longer waits are a schedule,
/// not a timeout, and bounding them keeps timestamp arithmetic far from overflow.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
/// See `check_bracket_depth`.
const MAX_BRACKET_DEPTH: usize = 1_000;
/// The path reported for problems with the document as a whole.
const ROOT: &str = "template";

/// A validated workflow template.
///
/// Its `Serialize` form is the canonical definition (see [`Template::definition`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Template {
    pub namespace: Namespace,
    pub name: TemplateName,
    /// At least 1.
    pub version: i32,
    pub description: Option<String>,
    pub on_failure: OnFailure,
    /// In declaration order; names are unique and the dependencies form a DAG.
    pub steps: Vec<StepDef>,
}

/// One step of a template, with the defaults already applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDef {
    pub name: StepName,
    pub handler: HandlerName,
    /// Always a JSON object, handed to the handler as is.
    pub config: Value,
    /// Steps that must be done before this one starts; no duplicates.
    pub depends_on: Vec<StepName>,
    /// How long one attempt may run; between 1ms and 24h.
    #[serde(rename = "timeout_ms", serialize_with = "as_millis")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// How often a failing step is tried, and how long to wait in between.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; between 1 and 100.
    pub max_attempts: u32,
    pub backoff: Backoff,
}

/// Exponential backoff: the wait after attempt `n` (from 1) is
/// `min(initial * multiplier^(n-1), max)`, then jittered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backoff {
    /// Between 1ms and 24h.
    #[serde(rename = "initial_ms", serialize_with = "as_millis")]
    pub initial: Duration,
    /// At least `initial`, at most 24h.
    #[serde(rename = "max_ms", serialize_with = "as_millis")]
    pub max: Duration,
    /// Finite and at least 1.0.
    pub multiplier: f64,
    pub jitter: Jitter,
}

/// How a computed wait `d` is randomised, so that steps failing together do
/// not all retry at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `[0, d]`.
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Exactly `d`.
    None,
}

impl Jitter {
    /// The spelling in templates and in the database (`full`, `equal`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::None => "none",
        }
    }
}

/// Why a template was refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TemplateError {
    /// JSON-style path such as `steps[2].depends_on[0]`; `steps` for problems
    /// of the graph as a whole, `template` for the document as a whole.
    pub path: String,
    pub message: String,
}

impl TemplateError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        TemplateError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Turns a check's message into an error at `path`, for use with `map_err`.
fn error_at(path: String) -> impl FnOnce(&'static str) -> TemplateError {
    move |message| TemplateError::at(path, message)
}

impl Template {
    /// Parses and validates a template written in YAML or JSON.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        check_bracket_depth(text)?;
        let value: serde_norway::Value = deserialize(serde_norway::Deserializer::from_str(text))?;
        deserialize::<RawTemplate>(&value)?.resolve()
    }

    /// Validates a template given as a JSON value, such as an API body, with
    /// the same rules as [`Template::parse`].
    pub fn from_json(value: &Value) -> Result<Template, TemplateError> {
        deserialize::<RawTemplate>(&to_yaml(value)?)?.resolve()
    }

    /// The canonical form: every default applied, durations as whole
    /// milliseconds (`timeout_ms`, `initial_ms`, `max_ms`). It is what the
    /// database stores and what [`Template::from_definition`] reads.
    pub fn definition(&self) -> Value {
        // Names, numbers, strings and JSON values always serialize to JSON.
        serde_json::to_value(self).expect("a template serializes to JSON")
    }

    /// Reads a canonical definition back, checking it like any other input.
    pub fn from_definition(value: &Value) -> Result<Template, TemplateError> {
        deserialize::<DefTemplate>(&to_yaml(value)?)?.check()
    }

    /// The step with this name, if the template declares one.
    pub fn step(&self, name: &StepName) -> Option<&StepDef> {
        self.steps.iter().find(|step| &step.name == name)
    }
}

/// Deserializes `T`, naming the path of the first field that does not fit.
fn deserialize<'de, T: Deserialize<'de>>(
    deserializer: impl Deserializer<'de>,
) -> Result<T, TemplateError> {
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.into_inner().to_string();
        // The YAML parser starts some messages with its own copy of the path.
        let message = match message.strip_prefix(&format!("{path}: ")) {
            Some(rest) => rest.to_owned(),
            None => message,
        };
        let path = if path == "." { ROOT.to_owned() } else { path };
        TemplateError::at(path, message)
    })
}

/// The YAML parser reads a whole document before its own depth limit (128)
/// applies, and its time grows with the square of the flow nesting: 128 KB of
/// `{a: {a: ...` costs seconds. So deep brackets are refused before parsing.
/// Brackets inside strings count too; that can only overcount, and the limit
/// is far above any nesting that deserialization accepts.
fn check_bracket_depth(text: &str) -> Result<(), TemplateError> {
    let mut depth = 0_usize;
    for byte in text.bytes() {
        match byte {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => continue,
        }
        if depth > MAX_BRACKET_DEPTH {
            let message = format!(
                "more than {MAX_BRACKET_DEPTH} nested brackets (those in strings count too)"
            );
            return Err(TemplateError::at(ROOT, message));
        }
    }
    Ok(())
}

fn to_yaml(value: &Value) -> Result<serde_norway::Value, TemplateError> {
    serde_norway::to_value(value).map_err(|error| TemplateError::at(ROOT, error.to_string()))
}

fn as_millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------
// The authored form.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a template mapping")]
struct RawTemplate {
    namespace: Namespace,
    name: TemplateName,
    version: Integer,
    description: Option<String>,
    #[serde(default)]
    on_failure: OnFailure,
    defaults: Option<RawDefaults>,
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of defaults")]
struct RawDefaults {
    timeout: Option<DurationText>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a step mapping")]
struct RawStep {
    name: StepName,
    handler: HandlerName,
    config: Option<Value>,
    #[serde(default)]
    depends_on: Vec<StepName>,
    timeout: Option<DurationText>,
    retry: Option<RawRetry>,
}

/// Every field optional: what is missing is inherited.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a retry mapping")]
struct RawRetry {
    max_attempts: Option<Integer>,
    backoff: Option<RawBackoff>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backoff mapping")]
struct RawBackoff {
    initial: Option<DurationText>,
    max: Option<DurationText>,
    multiplier: Option<f64>,
    jitter: Option<Jitter>,
}

impl RawTemplate {
    fn resolve(self) -> Result<Template, TemplateError> {
        let version = check_header(self.version, self.description.as_deref(), self.steps.len())?;
        let builtin = Settings::builtin();
        let defaults = match &self.defaults {
            Some(defaults) => {
                builtin.apply("defaults", defaults.timeout, defaults.retry.as_ref())?
            }
            None => builtin,
        };
        let steps = self
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| step.resolve(i, &defaults))
            .collect::<Result<Vec<_>, _>>()?;
        check_graph(&steps)?;
        Ok(Template {
            namespace: self.namespace,
            name: self.name,
            version,
            description: self.description,
            on_failure: self.on_failure,
            steps,
        })
    }
}

impl RawStep {
    fn resolve(self, i: usize, defaults: &Settings) -> Result<StepDef, TemplateError> {
        let at = format!("steps[{i}]");
        let config = check_config(self.config, &at)?;
        let settings = defaults.apply(&at, self.timeout, self.retry.as_ref())?;
        Ok(StepDef {
            name: self.name,
            handler: self.handler,
            config,
            depends_on: self.depends_on,
            timeout: settings.timeout,
            retry: settings.retry,
        })
    }
}

/// What a step inherits: built-in values, overridden by `defaults`, overridden
/// by the step itself, field by field.
#[derive(Clone)]
struct Settings {
    timeout: Duration,
    retry: RetryPolicy,
}

impl Settings {
    fn builtin() -> Settings {
        Settings {
            timeout: Duration::from_secs(30),
            retry: RetryPolicy {
                max_attempts: 3,
                backoff: Backoff {
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(60),
                    multiplier: 2.0,
                    jitter: Jitter::Full,
                },
            },
        }
    }

    /// Lays the fields written at `at` over these (valid) settings. Each value
    /// is checked where it was written, so the error points at the line the
    /// author must change rather than at the step that inherited it.
    fn apply(
        &self,
        at: &str,
        timeout: Option<DurationText>,
        retry: Option<&RawRetry>,
    ) -> Result<Settings, TemplateError> {
        let mut out = self.clone();
        if let Some(DurationText(timeout)) = timeout {
            out.timeout = check_wait(timeout).map_err(error_at(format!("{at}.timeout")))?;
        }
        let Some(retry) = retry else { return Ok(out) };
        if let Some(n) = retry.max_attempts {
            out.retry.max_attempts =
                check_max_attempts(n).map_err(error_at(format!("{at}.retry.max_attempts")))?;
        }
        let Some(written) = &retry.backoff else {
            return Ok(out);
        };
        let at = format!("{at}.retry.backoff");
        let backoff = &mut out.retry.backoff;
        if let Some(DurationText(initial)) = written.initial {
            backoff.initial = check_wait(initial).map_err(error_at(format!("{at}.initial")))?;
        }
        if let Some(DurationText(max)) = written.max {
            backoff.max = check_wait(max).map_err(error_at(format!("{at}.max")))?;
        }
        if let Some(multiplier) = written.multiplier {
            backoff.multiplier =
                check_multiplier(multiplier).map_err(error_at(format!("{at}.multiplier")))?;
        }
        if let Some(jitter) = written.jitter {
            backoff.jitter = jitter;
        }
        // The inherited pair was consistent, so a conflict involves a value
        // written here; blame `max` if it was, else `initial`.
        if backoff.max < backoff.initial {
            return Err(if written.max.is_some() {
                let initial = format_duration(backoff.initial);
                TemplateError::at(
                    format!("{at}.max"),
                    format!("must be at least initial ({initial})"),
                )
            } else {
                let max = format_duration(backoff.max);
                TemplateError::at(
                    format!("{at}.initial"),
                    format!("must be at most max ({max})"),
                )
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// The canonical form, as written by `Template::definition`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a template definition")]
struct DefTemplate {
    namespace: Namespace,
    name: TemplateName,
    version: Integer,
    description: Option<String>,
    on_failure: OnFailure,
    steps: Vec<DefStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a step definition")]
struct DefStep {
    name: StepName,
    handler: HandlerName,
    config: Value,
    depends_on: Vec<StepName>,
    timeout_ms: u64,
    retry: DefRetry,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a retry definition")]
struct DefRetry {
    max_attempts: Integer,
    backoff: DefBackoff,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backoff definition")]
struct DefBackoff {
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
    jitter: Jitter,
}

impl DefTemplate {
    fn check(self) -> Result<Template, TemplateError> {
        let version = check_header(self.version, self.description.as_deref(), self.steps.len())?;
        let steps = self
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| step.check(i))
            .collect::<Result<Vec<_>, _>>()?;
        check_graph(&steps)?;
        Ok(Template {
            namespace: self.namespace,
            name: self.name,
            version,
            description: self.description,
            on_failure: self.on_failure,
            steps,
        })
    }
}

impl DefStep {
    fn check(self, i: usize) -> Result<StepDef, TemplateError> {
        let at = format!("steps[{i}]");
        let config = check_config(Some(self.config), &at)?;
        let timeout = check_wait(Duration::from_millis(self.timeout_ms))
            .map_err(error_at(format!("{at}.timeout_ms")))?;
        let max_attempts = check_max_attempts(self.retry.max_attempts)
            .map_err(error_at(format!("{at}.retry.max_attempts")))?;
        let written = self.retry.backoff;
        let at = format!("{at}.retry.backoff");
        let initial = check_wait(Duration::from_millis(written.initial_ms))
            .map_err(error_at(format!("{at}.initial_ms")))?;
        let max = check_wait(Duration::from_millis(written.max_ms))
            .map_err(error_at(format!("{at}.max_ms")))?;
        if max < initial {
            let message = format!("must be at least initial_ms ({})", written.initial_ms);
            return Err(TemplateError::at(format!("{at}.max_ms"), message));
        }
        let multiplier =
            check_multiplier(written.multiplier).map_err(error_at(format!("{at}.multiplier")))?;
        Ok(StepDef {
            name: self.name,
            handler: self.handler,
            config,
            depends_on: self.depends_on,
            timeout,
            retry: RetryPolicy {
                max_attempts,
                backoff: Backoff {
                    initial,
                    max,
                    multiplier,
                    jitter: written.jitter,
                },
            },
        })
    }
}

// ---------------------------------------------------------------------------
// Rules shared by both forms.

/// Checks the template-level fields and returns the version.
fn check_header(
    version: Integer,
    description: Option<&str>,
    steps: usize,
) -> Result<i32, TemplateError> {
    let version = match version.0 {
        ..1 => return Err(TemplateError::at("version", "must be at least 1")),
        n => i32::try_from(n)
            .map_err(|_| TemplateError::at("version", format!("must be at most {}", i32::MAX)))?,
    };
    if description.is_some_and(|text| text.chars().count() > MAX_DESCRIPTION_CHARS) {
        let message = format!("must be at most {MAX_DESCRIPTION_CHARS} characters");
        return Err(TemplateError::at("description", message));
    }
    if steps == 0 {
        let message = "a template needs at least one step";
        return Err(TemplateError::at("steps", message));
    }
    if steps > MAX_STEPS {
        let message = format!("too many steps ({steps}): a template has at most {MAX_STEPS}");
        return Err(TemplateError::at("steps", message));
    }
    Ok(version)
}

/// A missing or null config is an empty object; anything else must be an object.
fn check_config(config: Option<Value>, step: &str) -> Result<Value, TemplateError> {
    match config {
        None | Some(Value::Null) => Ok(Value::Object(serde_json::Map::new())),
        Some(config @ Value::Object(_)) => Ok(config),
        Some(_) => Err(TemplateError::at(
            format!("{step}.config"),
            "must be a mapping (a JSON object)",
        )),
    }
}

/// A timeout or retry delay: positive and at most 24h.
fn check_wait(wait: Duration) -> Result<Duration, &'static str> {
    if wait.is_zero() {
        Err("must be greater than 0")
    } else if wait > MAX_WAIT {
        Err("must be at most 24h")
    } else {
        Ok(wait)
    }
}

fn check_max_attempts(n: Integer) -> Result<u32, &'static str> {
    match n.0 {
        ..1 => Err("must be at least 1"),
        // In range, so the conversion cannot fail.
        n @ 1..=MAX_ATTEMPTS => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => Err("must be at most 100"),
    }
}

fn check_multiplier(multiplier: f64) -> Result<f64, &'static str> {
    if multiplier.is_finite() && multiplier >= 1.0 {
        Ok(multiplier)
    } else {
        Err("must be a finite number of at least 1.0")
    }
}

/// Checks the dependency graph: unique step names, known and distinct
/// dependencies, and no cycle.
fn check_graph(steps: &[StepDef]) -> Result<(), TemplateError> {
    let mut index: HashMap<&StepName, usize> = HashMap::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        match index.entry(&step.name) {
            Entry::Occupied(first) => {
                let message = format!(
                    "duplicate step name {:?} (first declared at steps[{}])",
                    step.name.as_str(),
                    first.get()
                );
                return Err(TemplateError::at(format!("steps[{i}].name"), message));
            }
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
    }

    // deps[i]: indexes of the steps that step i depends on, in listed order.
    let mut deps = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let mut targets = Vec::with_capacity(step.depends_on.len());
        // Where each target was first listed, to name it in the error.
        let mut listed: HashMap<usize, usize> = HashMap::with_capacity(step.depends_on.len());
        for (j, dep) in step.depends_on.iter().enumerate() {
            let at = format!("steps[{i}].depends_on[{j}]");
            let Some(&target) = index.get(dep) else {
                return Err(TemplateError::at(
                    at,
                    format!("unknown step {:?}", dep.as_str()),
                ));
            };
            if target == i {
                let message = format!("step {:?} cannot depend on itself", dep.as_str());
                return Err(TemplateError::at(at, message));
            }
            if let Some(first) = listed.insert(target, j) {
                let message = format!(
                    "duplicate dependency {:?} (first listed at depends_on[{first}])",
                    dep.as_str()
                );
                return Err(TemplateError::at(at, message));
            }
            targets.push(target);
        }
        deps.push(targets);
    }

    if let Some(cycle) = find_cycle(&deps) {
        let names: Vec<&str> = cycle.iter().map(|&i| steps[i].name.as_str()).collect();
        let message = format!("dependency cycle: {}", names.join(" -> "));
        return Err(TemplateError::at("steps", message));
    }
    Ok(())
}

/// Finds one cycle, deterministically: a depth-first search from each step in
/// declaration order, following `depends_on` in listed order. The result
/// starts and ends with the same step and each element depends on the next
/// (`a -> b` reads "a depends on b"). Iterative, so a long chain of steps
/// cannot overflow the stack.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unvisited,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::Unvisited; deps.len()];
    for root in 0..deps.len() {
        if mark[root] != Mark::Unvisited {
            continue;
        }
        // The current path from `root`, each step with the next edge to follow.
        let mut path = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some((node, edge)) = path.last_mut() {
            let node = *node;
            let Some(&next) = deps[node].get(*edge) else {
                mark[node] = Mark::Done;
                path.pop();
                continue;
            };
            *edge += 1;
            match mark[next] {
                Mark::Unvisited => {
                    mark[next] = Mark::OnPath;
                    path.push((next, 0));
                }
                Mark::OnPath => {
                    let start = path.iter().position(|&(step, _)| step == next).unwrap_or(0);
                    let mut cycle: Vec<usize> =
                        path[start..].iter().map(|&(step, _)| step).collect();
                    cycle.push(next);
                    return Some(cycle);
                }
                Mark::Done => {}
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Scalars.

/// A whole number as written. Ranges are checked afterwards so that the
/// message names the rule (`must be at least 1`), not a Rust type (`u32`).
#[derive(Clone, Copy)]
struct Integer(i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntegerVisitor;
        impl Visitor<'_> for IntegerVisitor {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Integer, E> {
                Ok(Integer(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Integer, E> {
                // Anything this large fails the range checks either way.
                Ok(Integer(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(IntegerVisitor)
    }
}

/// A duration as written in a template, such as `30s`; see [`parse_duration`].
#[derive(Clone, Copy)]
struct DurationText(Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s or 5m")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationText, E> {
                parse_duration(text).map(DurationText).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Units of a duration, longest spelling first so that `ms` is not read as `m`.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h` or `1m30s`: one or
/// more whole numbers, each followed by a unit. No fractions, signs or spaces,
/// so that what an author reads is exactly what runs.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {text:?}: expected a whole number followed by ms, s, m or h, \
             such as 500ms, 30s or 5m"
        )
    };
    let too_large = || format!("invalid duration {text:?}: too large");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        // Only ASCII digits remain, so parsing fails on overflow alone.
        let number: u64 = rest[..digits].parse().map_err(|_| too_large())?;
        let (unit_ms, after) = UNITS
            .iter()
            .find_map(|&(unit, ms)| rest[digits..].strip_prefix(unit).map(|after| (ms, after)))
            .ok_or_else(invalid)?;
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(too_large)?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Writes a duration in the largest unit that divides it, as `parse_duration` reads it.
fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    UNITS
        .iter()
        .rev()
        .find(|&&(_, size)| ms > 0 && ms % u128::from(size) == 0)
        .map_or_else(
            || format!("{ms}ms"),
            |&(unit, size)| format!("{}{unit}", ms / u128::from(size)),
        )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const SPEC_EXAMPLE: &str = r#"
namespace: shop
name: fulfil_order
version: 1
description: Charge, reserve, then ship.
on_failure: fail_fast        # or: continue
defaults:
  timeout: 30s
  retry: { max_attempts: 3, backoff: { initial: 1s, max: 60s, multiplier: 2.0, jitter: full } }
steps:
  - name: validate
    handler: shop.validate
  - name: charge
    handler: shop.charge
    depends_on: [validate]
    retry: { max_attempts: 5 }
  - name: reserve
    handler: shop.reserve
    depends_on: [validate]
  - name: ship
    handler: builtin.http
    config: { method: POST, url: "http://shipping.internal/ship" }
    depends_on: [charge, reserve]
"#;

    /// A template with a valid header around the given `steps:` items.
    fn with_steps(steps: &str) -> String {
        format!("namespace: shop\nname: t\nversion: 1\nsteps:\n{steps}")
    }

    fn step_name(name: &str) -> StepName {
        StepName::parse(name).expect("valid step name")
    }

    #[track_caller]
    fn check(input: &str, expected: &str) {
        match Template::parse(input) {
            Ok(template) => panic!("accepted, expected {expected:?}:\n{input}\n{template:#?}"),
            Err(error) => assert_eq!(error.to_string(), expected, "input:\n{input}"),
        }
    }

    #[test]
    fn refusals() {
        let one = "  - { name: a, handler: h }\n";
        let many_steps: String = (0..=MAX_STEPS)
            .map(|i| format!("  - {{ name: s{i}, handler: h }}\n"))
            .collect();
        let long_description = format!(
            "namespace: shop\nname: t\nversion: 1\ndescription: {}\nsteps:\n{one}",
            "x".repeat(1001)
        );
        let header = |fields: &str| format!("{fields}steps:\n{one}");
        let cases: Vec<(String, &str)> = vec![
            // Unknown keys, missing fields, wrong types.
            (
                header("namespace: shop\nname: t\nversion: 1\nonfailure: continue\n"),
                "onfailure: unknown field `onfailure`, expected one of `namespace`, `name`, \
                 `version`, `description`, `on_failure`, `defaults`, `steps`",
            ),
            (
                with_steps("  - { name: a, handler: h, dependson: [b] }\n"),
                "steps[0].dependson: unknown field `dependson`, expected one of `name`, \
                 `handler`, `config`, `depends_on`, `timeout`, `retry`",
            ),
            (
                with_steps("  - { name: a, handler: h, retry: { backoff: { jiter: full } } }\n"),
                "steps[0].retry.backoff.jiter: unknown field `jiter`, expected one of \
                 `initial`, `max`, `multiplier`, `jitter`",
            ),
            (
                header("namespace: shop\nname: t\nversion: 1\ndefaults: { retries: 3 }\n"),
                "defaults.retries: unknown field `retries`, expected `timeout` or `retry`",
            ),
            (
                header("name: t\nversion: 1\n"),
                "template: missing field `namespace`",
            ),
            (
                with_steps(&format!("{one}  - {{ name: b }}\n")),
                "steps[1]: missing field `handler`",
            ),
            (
                "namespace: shop\nname: t\nversion: 1\nsteps: { a: 1 }\n".into(),
                "steps: invalid type: map, expected a sequence",
            ),
            (
                with_steps("  - a\n"),
                "steps[0]: invalid type: string \"a\", expected a step mapping",
            ),
            (
                with_steps("  - { name: a, handler: h, retry: [3] }\n"),
                "steps[0].retry: invalid type: sequence, expected a retry mapping",
            ),
            (
                header("namespace: shop\nname: t\nversion: 1\non_failure: stop\n"),
                "on_failure: unknown variant `stop`, expected `fail_fast` or `continue`",
            ),
            (
                with_steps("  - { name: a, handler: h, retry: { backoff: { jitter: half } } }\n"),
                "steps[0].retry.backoff.jitter: unknown variant `half`, expected one of \
                 `full`, `equal`, `none`",
            ),
            // Names.
            (
                header("namespace: Shop\nname: t\nversion: 1\n"),
                "namespace: invalid namespace \"Shop\": must match ^[a-z][a-z0-9_]{0,29}$",
            ),
            (
                header("namespace: shop\nname: fulfil-order\nversion: 1\n"),
                "name: invalid template name \"fulfil-order\": must match ^[a-z][a-z0-9_]{0,62}$",
            ),
            (
                with_steps("  - { name: 1st, handler: h }\n"),
                "steps[0].name: invalid step name \"1st\": must match ^[a-z][a-z0-9_]{0,62}$",
            ),
            (
                with_steps("  - { name: a, handler: shop..charge }\n"),
                "steps[0].handler: invalid handler name \"shop..charge\": must be dot-separated \
                 segments matching ^[a-z][a-z0-9_]*$, at most 128 characters",
            ),
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h, depends_on: [a, A] }}\n"
                )),
                "steps[1].depends_on[1]: invalid step name \"A\": must match ^[a-z][a-z0-9_]{0,62}$",
            ),
            // Header.
            (
                header("namespace: shop\nname: t\nversion: 0\n"),
                "version: must be at least 1",
            ),
            (
                header("namespace: shop\nname: t\nversion: 1.5\n"),
                "version: invalid type: floating point `1.5`, expected a whole number",
            ),
            (
                header("namespace: shop\nname: t\nversion: \"1\"\n"),
                "version: invalid type: string \"1\", expected a whole number",
            ),
            (
                header("namespace: shop\nname: t\nversion: 2147483648\n"),
                "version: must be at most 2147483647",
            ),
            (
                long_description,
                "description: must be at most 1000 characters",
            ),
            (
                "namespace: shop\nname: t\nversion: 1\nsteps: []\n".into(),
                "steps: a template needs at least one step",
            ),
            (
                with_steps(&many_steps),
                "steps: too many steps (5001): a template has at most 5000",
            ),
            // Graph.
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h }}\n  - {{ name: a, handler: h }}\n"
                )),
                "steps[2].name: duplicate step name \"a\" (first declared at steps[0])",
            ),
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h, depends_on: [chrage] }}\n"
                )),
                "steps[1].depends_on[0]: unknown step \"chrage\"",
            ),
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h, depends_on: [a, b] }}\n"
                )),
                "steps[1].depends_on[1]: step \"b\" cannot depend on itself",
            ),
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h, depends_on: [a, a] }}\n"
                )),
                "steps[1].depends_on[1]: duplicate dependency \"a\" (first listed at depends_on[0])",
            ),
            (
                with_steps(
                    "  - { name: a, handler: h, depends_on: [b] }\n\
                     \x20 - { name: b, handler: h, depends_on: [c] }\n\
                     \x20 - { name: c, handler: h, depends_on: [a] }\n",
                ),
                "steps: dependency cycle: a -> b -> c -> a",
            ),
            (
                // The search starts at `x`, which is not on the cycle.
                with_steps(
                    "  - { name: x, handler: h, depends_on: [b] }\n\
                     \x20 - { name: b, handler: h, depends_on: [c] }\n\
                     \x20 - { name: c, handler: h, depends_on: [d] }\n\
                     \x20 - { name: d, handler: h, depends_on: [b] }\n",
                ),
                "steps: dependency cycle: b -> c -> d -> b",
            ),
            // Durations and retries.
            (
                with_steps("  - { name: a, handler: h, timeout: 3x }\n"),
                "steps[0].timeout: invalid duration \"3x\": expected a whole number followed by \
                 ms, s, m or h, such as 500ms, 30s or 5m",
            ),
            (
                with_steps("  - { name: a, handler: h, timeout: 30 }\n"),
                "steps[0].timeout: invalid type: integer `30`, expected a duration such as 500ms, \
                 30s or 5m",
            ),
            (
                with_steps("  - { name: a, handler: h, timeout: 0s }\n"),
                "steps[0].timeout: must be greater than 0",
            ),
            (
                with_steps("  - { name: a, handler: h, timeout: 25h }\n"),
                "steps[0].timeout: must be at most 24h",
            ),
            (
                header("namespace: shop\nname: t\nversion: 1\ndefaults: { timeout: 1.5s }\n"),
                "defaults.timeout: invalid duration \"1.5s\": expected a whole number followed by \
                 ms, s, m or h, such as 500ms, 30s or 5m",
            ),
            (
                with_steps(&format!(
                    "{one}  - {{ name: b, handler: h, retry: {{ max_attempts: 0 }} }}\n"
                )),
                "steps[1].retry.max_attempts: must be at least 1",
            ),
            (
                with_steps("  - { name: a, handler: h, retry: { max_attempts: -2 } }\n"),
                "steps[0].retry.max_attempts: must be at least 1",
            ),
            (
                header(
                    "namespace: shop\nname: t\nversion: 1\ndefaults: { retry: { max_attempts: 101 } }\n",
                ),
                "defaults.retry.max_attempts: must be at most 100",
            ),
            (
                with_steps("  - { name: a, handler: h, retry: { backoff: { initial: 0ms } } }\n"),
                "steps[0].retry.backoff.initial: must be greater than 0",
            ),
            (
                // The step's own max conflicts with the built-in initial (1s).
                with_steps("  - { name: a, handler: h, retry: { backoff: { max: 500ms } } }\n"),
                "steps[0].retry.backoff.max: must be at least initial (1s)",
            ),
            (
                // The step's own initial conflicts with the inherited max.
                "namespace: shop\nname: t\nversion: 1\ndefaults: { retry: { backoff: { max: 90s } } }\n\
                 steps:\n  - { name: a, handler: h, retry: { backoff: { initial: 2m } } }\n"
                    .into(),
                "steps[0].retry.backoff.initial: must be at most max (90s)",
            ),
            (
                header(
                    "namespace: shop\nname: t\nversion: 1\ndefaults: { retry: { backoff: { initial: 2m } } }\n",
                ),
                "defaults.retry.backoff.initial: must be at most max (1m)",
            ),
            (
                with_steps(
                    "  - { name: a, handler: h, retry: { backoff: { multiplier: 0.5 } } }\n",
                ),
                "steps[0].retry.backoff.multiplier: must be a finite number of at least 1.0",
            ),
            (
                with_steps(
                    "  - { name: a, handler: h, retry: { backoff: { multiplier: .inf } } }\n",
                ),
                "steps[0].retry.backoff.multiplier: must be a finite number of at least 1.0",
            ),
            // Config.
            (
                with_steps("  - { name: a, handler: h, config: [1, 2] }\n"),
                "steps[0].config: must be a mapping (a JSON object)",
            ),
            // Documents that are not templates at all.
            ("".into(), "template: missing field `namespace`"),
            (
                "garbage".into(),
                "template: invalid type: string \"garbage\", expected a template mapping",
            ),
            (
                "[1, 2]".into(),
                "template: invalid type: sequence, expected a template mapping",
            ),
            (
                "namespace: shop\nnamespace: shop\n".into(),
                "template: duplicate entry with key \"namespace\"",
            ),
            (
                with_steps("  - { name: a, handler: h, name: b }\n"),
                "steps[0]: duplicate entry with key \"name\" at line 5 column 5",
            ),
            (
                "namespace: [\n".into(),
                "namespace: did not find expected node content at line 2 column 1, while parsing a flow node",
            ),
            (
                "a: 1\n---\nb: 2\n".into(),
                "template: deserializing from YAML containing more than one document is not supported",
            ),
            (
                "\u{0}".into(),
                "template: control characters are not allowed",
            ),
        ];
        for (input, expected) in &cases {
            check(input, expected);
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let expected = format!(
            "{}: recursion limit exceeded at line 1 column 129",
            "[0]".repeat(128)
        );
        check(&"[".repeat(1_000), &expected);
        let expected = format!(
            "{}: recursion limit exceeded at line 1 column 513",
            ["a"; 128].join(".")
        );
        check(&"{a: ".repeat(1_000), &expected);
        // Deeper than that is refused before parsing: the parser would take minutes.
        let expected = "template: more than 1000 nested brackets (those in strings count too)";
        check(&"{a: ".repeat(1_000_000), expected);
        check(&format!("a: \"{}\"", "[".repeat(1_001)), expected);
        // Balanced brackets in strings do not add up.
        let many: String = (0..2_000)
            .map(|i| format!("  - {{ name: s{i}, handler: h, config: {{ re: \"[a-z]\" }} }}\n"))
            .collect();
        assert!(Template::parse(&with_steps(&many)).is_ok());
        // An alias that contains itself would expand forever.
        let text = with_steps("  - { name: a, handler: h, config: &x { y: *x } }\n");
        let error = Template::parse(&text).expect_err("recursive alias");
        assert!(
            error.message.starts_with("recursion limit exceeded"),
            "{error}"
        );
    }

    #[test]
    fn json_shapes_are_not_read_by_position() {
        // serde_json would fill a struct from an array; a template is a mapping.
        let error = Template::from_json(&json!(["shop", "t", 1, []])).expect_err("array");
        assert_eq!(
            error.to_string(),
            "template: invalid type: sequence, expected a template mapping"
        );
        let steps =
            json!({ "namespace": "shop", "name": "t", "version": 1, "steps": [["a", "h"]] });
        let error = Template::from_json(&steps).expect_err("step as array");
        assert_eq!(
            error.to_string(),
            "steps[0]: invalid type: sequence, expected a step mapping"
        );
    }

    #[test]
    fn spec_example_parses() {
        let template = Template::parse(SPEC_EXAMPLE).expect("spec example");
        assert_eq!(template.namespace.as_str(), "shop");
        assert_eq!(template.name.as_str(), "fulfil_order");
        assert_eq!(template.version, 1);
        assert_eq!(
            template.description.as_deref(),
            Some("Charge, reserve, then ship.")
        );
        assert_eq!(template.on_failure, OnFailure::FailFast);
        let names: Vec<&str> = template
            .steps
            .iter()
            .map(|step| step.name.as_str())
            .collect();
        assert_eq!(names, ["validate", "charge", "reserve", "ship"]);

        let ship = template.step(&step_name("ship")).expect("ship");
        assert_eq!(ship.handler.as_str(), "builtin.http");
        assert_eq!(
            ship.config,
            json!({ "method": "POST", "url": "http://shipping.internal/ship" })
        );
        assert_eq!(ship.depends_on, [step_name("charge"), step_name("reserve")]);

        let validate = template.step(&step_name("validate")).expect("validate");
        assert_eq!(validate.config, json!({}));
        assert!(validate.depends_on.is_empty());
        assert_eq!(validate.timeout, Duration::from_secs(30));
        assert_eq!(validate.retry, Settings::builtin().retry);

        let charge = template.step(&step_name("charge")).expect("charge");
        assert_eq!(charge.retry.max_attempts, 5);
        assert_eq!(charge.retry.backoff, Settings::builtin().retry.backoff);
        assert!(template.step(&step_name("refund")).is_none());
    }

    #[test]
    fn defaults_merge_field_by_field() {
        let template = Template::parse(
            "namespace: shop\nname: t\nversion: 3\non_failure: continue\n\
             defaults:\n  timeout: 10s\n  retry: { max_attempts: 7, backoff: { initial: 2s, multiplier: 3 } }\n\
             steps:\n\
             \x20 - { name: plain, handler: h }\n\
             \x20 - name: own\n    handler: h\n    timeout: 1m30s\n\
             \x20   retry: { backoff: { max: 2m, jitter: none } }\n",
        )
        .expect("valid");
        assert_eq!(template.version, 3);
        assert_eq!(template.on_failure, OnFailure::Continue);
        let plain = &template.steps[0];
        assert_eq!(plain.timeout, Duration::from_secs(10));
        assert_eq!(
            plain.retry,
            RetryPolicy {
                max_attempts: 7,
                backoff: Backoff {
                    initial: Duration::from_secs(2),
                    max: Duration::from_secs(60),
                    multiplier: 3.0,
                    jitter: Jitter::Full,
                },
            }
        );
        let own = &template.steps[1];
        assert_eq!(own.timeout, Duration::from_secs(90));
        assert_eq!(
            own.retry,
            RetryPolicy {
                max_attempts: 7,
                backoff: Backoff {
                    initial: Duration::from_secs(2),
                    max: Duration::from_secs(120),
                    multiplier: 3.0,
                    jitter: Jitter::None,
                },
            }
        );
    }

    #[test]
    fn json_input_is_accepted() {
        let body = json!({
            "namespace": "shop",
            "name": "fulfil_order",
            "version": 1,
            "description": "Charge, reserve, then ship.",
            "on_failure": "fail_fast",
            "defaults": {
                "timeout": "30s",
                "retry": { "max_attempts": 3, "backoff": { "initial": "1s", "max": "60s", "multiplier": 2.0, "jitter": "full" } }
            },
            "steps": [
                { "name": "validate", "handler": "shop.validate" },
                { "name": "charge", "handler": "shop.charge", "depends_on": ["validate"], "retry": { "max_attempts": 5 } },
                { "name": "reserve", "handler": "shop.reserve", "depends_on": ["validate"] },
                {
                    "name": "ship", "handler": "builtin.http", "depends_on": ["charge", "reserve"],
                    "config": { "method": "POST", "url": "http://shipping.internal/ship" }
                }
            ]
        });
        let expected = Template::parse(SPEC_EXAMPLE).expect("spec example");
        assert_eq!(Template::from_json(&body).expect("JSON value"), expected);
        assert_eq!(
            Template::parse(&body.to_string()).expect("JSON text"),
            expected
        );
    }

    #[test]
    fn definition_is_canonical_and_round_trips() {
        let template = Template::parse(&with_steps(
            "  - { name: a, handler: h }\n  - { name: b, handler: x.y, depends_on: [a], config: { k: [1, true] }, \
             timeout: 1500ms, retry: { max_attempts: 2, backoff: { multiplier: 1.5, jitter: equal } } }\n",
        ))
        .expect("valid");
        let definition = template.definition();
        let retry = |max_attempts: u32, multiplier: f64, jitter: &str| {
            json!({
                "max_attempts": max_attempts,
                "backoff": { "initial_ms": 1000, "max_ms": 60000, "multiplier": multiplier, "jitter": jitter }
            })
        };
        assert_eq!(
            definition,
            json!({
                "namespace": "shop", "name": "t", "version": 1, "description": null, "on_failure": "fail_fast",
                "steps": [
                    { "name": "a", "handler": "h", "config": {}, "depends_on": [], "timeout_ms": 30000,
                      "retry": retry(3, 2.0, "full") },
                    { "name": "b", "handler": "x.y", "config": { "k": [1, true] }, "depends_on": ["a"],
                      "timeout_ms": 1500, "retry": retry(2, 1.5, "equal") },
                ]
            })
        );
        assert_eq!(
            Template::from_definition(&definition).expect("round trip"),
            template
        );
        let spec = Template::parse(SPEC_EXAMPLE).expect("spec example");
        assert_eq!(
            Template::from_definition(&spec.definition()).expect("round trip"),
            spec
        );
    }

    #[test]
    fn definitions_are_checked_too() {
        let definition = Template::parse(&with_steps("  - { name: a, handler: h }\n"))
            .expect("valid")
            .definition();
        let refused = |edit: &dyn Fn(&mut Value), expected: &str| {
            let mut definition = definition.clone();
            edit(&mut definition);
            let error = Template::from_definition(&definition).expect_err(expected);
            assert_eq!(error.to_string(), expected);
        };
        refused(
            &|d| d["steps"][0]["timeout"] = json!("30s"),
            "steps[0].timeout: unknown field `timeout`, expected one of `name`, `handler`, \
             `config`, `depends_on`, `timeout_ms`, `retry`",
        );
        refused(
            &|d| d["steps"][0]["timeout_ms"] = json!(0),
            "steps[0].timeout_ms: must be greater than 0",
        );
        refused(
            &|d| d["steps"][0]["retry"]["backoff"]["max_ms"] = json!(10),
            "steps[0].retry.backoff.max_ms: must be at least initial_ms (1000)",
        );
        refused(
            &|d| d["steps"][0]["retry"]["max_attempts"] = json!(0),
            "steps[0].retry.max_attempts: must be at least 1",
        );
        refused(
            &|d| d["steps"][0]["depends_on"] = json!(["a"]),
            "steps[0].depends_on[0]: step \"a\" cannot depend on itself",
        );
        refused(
            &|d| d["steps"] = json!([]),
            "steps: a template needs at least one step",
        );
        refused(
            &|d| {
                if let Some(object) = d.as_object_mut() {
                    object.remove("on_failure");
                }
            },
            "template: missing field `on_failure`",
        );
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        let good = [
            ("500ms", ms(500)),
            ("0s", ms(0)),
            ("30s", ms(30_000)),
            ("5m", ms(300_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1h2m3s4ms", ms(3_723_004)),
            ("007s", ms(7_000)),
        ];
        for (text, expected) in good {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let expected_format =
            "expected a whole number followed by ms, s, m or h, such as 500ms, 30s or 5m";
        for text in [
            "", "3x", "30", "s", "1.5s", "-1s", " 1s", "1s ", "1 s", "1S", "1sec", "1m30", "1d",
            "٣s",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(format!("invalid duration {text:?}: {expected_format}")),
                "{text:?}"
            );
        }
        for text in [
            "99999999999999999999s",
            "18446744073709551615h",
            "18446744073709551615ms1ms",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(format!("invalid duration {text:?}: too large"))
            );
        }
    }

    #[test]
    fn jitter_spellings_agree_with_serde() {
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::None] {
            assert_eq!(
                serde_json::to_value(jitter).expect("serializes"),
                json!(jitter.as_str())
            );
        }
    }

    #[test]
    fn durations_format_as_parsed() {
        for (text, millis) in [
            ("0ms", 0),
            ("1500ms", 1500),
            ("2s", 2000),
            ("90s", 90_000),
            ("2m", 120_000),
            ("24h", 86_400_000),
        ] {
            assert_eq!(format_duration(Duration::from_millis(millis)), text);
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(millis)));
        }
    }

    /// A random DAG: step `i` may depend only on steps declared before it.
    fn dag() -> impl Strategy<Value = Vec<Vec<usize>>> {
        (1usize..30).prop_flat_map(|n| {
            (0..n)
                .map(|i| proptest::sample::subsequence((0..i).collect::<Vec<_>>(), 0..=i))
                .collect::<Vec<_>>()
        })
    }

    fn template_json(deps: &[Vec<usize>]) -> String {
        let steps: Vec<Value> = deps
            .iter()
            .enumerate()
            .map(|(i, deps)| {
                let depends_on: Vec<String> = deps.iter().map(|d| format!("s{d}")).collect();
                json!({ "name": format!("s{i}"), "handler": "h", "depends_on": depends_on })
            })
            .collect();
        json!({ "namespace": "shop", "name": "t", "version": 1, "steps": steps }).to_string()
    }

    proptest! {
        #[test]
        fn dags_are_accepted(deps in dag()) {
            let template = Template::parse(&template_json(&deps)).expect("a DAG is valid");
            prop_assert_eq!(template.steps.len(), deps.len());
            prop_assert_eq!(Template::from_definition(&template.definition()).expect("round trip"), template);
        }

        #[test]
        fn a_back_edge_is_named_as_a_cycle(
            mut deps in dag().prop_filter("a cycle needs two steps", |deps| deps.len() >= 2),
            from in any::<proptest::sample::Index>(),
            to in any::<proptest::sample::Index>(),
        ) {
            // Make `later` depend on `earlier` (if it does not yet), then close
            // the loop with `earlier` depending on `later`.
            let n = deps.len();
            let earlier = from.index(n - 1);
            let later = earlier + 1 + to.index(n - 1 - earlier);
            if !deps[later].contains(&earlier) {
                deps[later].push(earlier);
            }
            deps[earlier].push(later);

            let error = Template::parse(&template_json(&deps)).expect_err("a cycle is refused");
            prop_assert_eq!(&error.path, "steps");
            let cycle = error.message.strip_prefix("dependency cycle: ").expect("names the cycle");
            let cycle: Vec<usize> = cycle
                .split(" -> ")
                .map(|name| name.strip_prefix('s').and_then(|i| i.parse().ok()).expect("a step name"))
                .collect();
            prop_assert!(cycle.len() >= 3, "{:?}", cycle);
            prop_assert_eq!(cycle.first(), cycle.last());
            for pair in cycle.windows(2) {
                prop_assert!(deps[pair[0]].contains(&pair[1]), "{} does not depend on {}", pair[0], pair[1]);
            }
            // A simple cycle: no step repeats before the loop closes.
            let distinct: HashSet<usize> = cycle[1..].iter().copied().collect();
            prop_assert_eq!(distinct.len(), cycle.len() - 1);
        }

        #[test]
        fn garbage_is_refused_without_panicking(text in "\\PC{0,200}") {
            // Most such strings are not templates; the point is an Err, never a panic.
            let _ = Template::parse(&text);
        }
    }
}
