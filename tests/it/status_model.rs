//! The SQL status model against a reference model written in Rust from the
//! precedence table, for every assignment of step states to small DAGs, plus
//! the seed scenario and racing transitions.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::json;
use shared::{ExecutionStatus, StepState, TaskState};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support;

/// One way a step can be, as far as readiness is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Pending,
    Enqueued,
    /// waiting_retry, attempts left, backoff elapsed
    RetryDue,
    /// waiting_retry, attempts left, backoff not elapsed
    RetryLater,
    /// waiting_retry with no attempt left, backoff elapsed
    ExhaustedDue,
    /// waiting_retry with no attempt left, backoff not elapsed
    ExhaustedLater,
    /// waiting_retry after a permanent failure (not retryable), backoff elapsed
    NotRetryableDue,
    Complete,
    Error,
    Cancelled,
    Resolved,
}

const VARIANTS: [Variant; 11] = [
    Variant::Pending,
    Variant::Enqueued,
    Variant::RetryDue,
    Variant::RetryLater,
    Variant::ExhaustedDue,
    Variant::ExhaustedLater,
    Variant::NotRetryableDue,
    Variant::Complete,
    Variant::Error,
    Variant::Cancelled,
    Variant::Resolved,
];

const MAX_ATTEMPTS: i32 = 3;

/// A step row in that variant: (state, attempts, retryable, next_attempt_at, enqueued_at, finished_at).
type StepRow = (
    StepState,
    i32,
    bool,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

impl Variant {
    fn row(self, now: DateTime<Utc>) -> StepRow {
        let past = Some(now - Duration::seconds(1));
        let future = Some(now + Duration::hours(1));
        let done = Some(now - Duration::seconds(5));
        match self {
            Variant::Pending => (StepState::Pending, 0, true, None, None, None),
            Variant::Enqueued => (StepState::Enqueued, 1, true, None, done, None),
            Variant::RetryDue => (StepState::WaitingRetry, 1, true, past, None, None),
            Variant::RetryLater => (StepState::WaitingRetry, 1, true, future, None, None),
            Variant::ExhaustedDue => (
                StepState::WaitingRetry,
                MAX_ATTEMPTS,
                true,
                past,
                None,
                None,
            ),
            Variant::ExhaustedLater => (
                StepState::WaitingRetry,
                MAX_ATTEMPTS,
                true,
                future,
                None,
                None,
            ),
            Variant::NotRetryableDue => (StepState::WaitingRetry, 1, false, past, None, None),
            Variant::Complete => (StepState::Complete, 1, true, None, None, done),
            Variant::Error => (StepState::Error, 1, false, None, None, done),
            Variant::Cancelled => (StepState::Cancelled, 0, true, None, None, done),
            Variant::Resolved => (StepState::Resolved, 1, true, None, None, done),
        }
    }
}

struct Shape {
    name: &'static str,
    steps: usize,
    /// (step, the step it depends on)
    edges: &'static [(usize, usize)],
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "chain",
        steps: 4,
        edges: &[(1, 0), (2, 1), (3, 2)],
    },
    Shape {
        name: "diamond",
        steps: 4,
        edges: &[(1, 0), (2, 0), (3, 1), (3, 2)],
    },
    Shape {
        name: "independent",
        steps: 3,
        edges: &[],
    },
    Shape {
        name: "fan_in",
        steps: 4,
        edges: &[(3, 0), (3, 1), (3, 2)],
    },
];

/// What the reference model says about one task.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    status: ExecutionStatus,
    ready: Vec<bool>,
    enqueued: Vec<bool>,
    final_state: TaskState,
}

/// The reference model, written from SPEC section 4 and the precedence table
/// of section 1, independently of the SQL.
fn model(shape: &Shape, variants: &[Variant], continue_on_failure: bool) -> Expected {
    use Variant::*;
    let satisfied = |v: Variant| matches!(v, Complete | Resolved);
    let deps_ok = |i: usize| {
        shape
            .edges
            .iter()
            .filter(|(s, _)| *s == i)
            .all(|(_, d)| satisfied(variants[*d]))
    };
    // Ready: waits to run, dependencies satisfied, an attempt left, backoff elapsed.
    let ready: Vec<bool> = (0..shape.steps)
        .map(|i| matches!(variants[i], Pending | RetryDue) && deps_ok(i))
        .collect();
    // Failed: can never complete.
    let failed = variants.iter().any(|v| {
        matches!(
            v,
            Error | Cancelled | ExhaustedDue | ExhaustedLater | NotRetryableDue
        )
    });
    let in_flight = variants.contains(&Enqueued);
    let retry_later = variants.contains(&RetryLater);
    let any_ready = ready.contains(&true);
    let status = if failed {
        ExecutionStatus::BlockedByFailures
    } else if any_ready {
        ExecutionStatus::HasReadySteps
    } else if in_flight {
        ExecutionStatus::Processing
    } else if variants.iter().all(|v| satisfied(*v)) {
        ExecutionStatus::AllComplete
    } else {
        ExecutionStatus::WaitingForDependencies
    };
    let enqueued = ready
        .iter()
        .map(|r| *r && (!failed || continue_on_failure))
        .collect();
    let final_state = if status == ExecutionStatus::AllComplete {
        TaskState::Complete
    } else if failed && !in_flight && (!continue_on_failure || (!any_ready && !retry_later)) {
        TaskState::Error
    } else {
        TaskState::Running
    };
    Expected {
        status,
        ready,
        enqueued,
        final_state,
    }
}

struct Case {
    task_id: Uuid,
    step_ids: Vec<Uuid>,
    expected: Expected,
    label: String,
}

fn combinations(steps: usize) -> impl Iterator<Item = Vec<Variant>> {
    let total = VARIANTS.len().pow(steps as u32);
    (0..total).map(move |mut n| {
        (0..steps)
            .map(|_| {
                let v = VARIANTS[n % VARIANTS.len()];
                n /= VARIANTS.len();
                v
            })
            .collect()
    })
}

async fn insert_cases(pool: &PgPool, now: DateTime<Utc>) -> Vec<Case> {
    let mut cases = Vec::new();
    for shape in &SHAPES {
        let template_id = combo_template(pool, shape.name).await;
        for on_failure in ["fail_fast", "continue"] {
            let mut tasks = Vec::new();
            let mut steps: Vec<(Uuid, Uuid, i32, StepRow)> = Vec::new();
            let mut edges: Vec<(Uuid, Uuid, Uuid)> = Vec::new();
            for variants in combinations(shape.steps) {
                let task_id = Uuid::new_v4();
                let step_ids: Vec<Uuid> = (0..shape.steps).map(|_| Uuid::new_v4()).collect();
                for (i, v) in variants.iter().enumerate() {
                    steps.push((task_id, step_ids[i], i as i32, v.row(now)));
                }
                for (s, d) in shape.edges {
                    edges.push((task_id, step_ids[*s], step_ids[*d]));
                }
                tasks.push(task_id);
                cases.push(Case {
                    task_id,
                    step_ids,
                    expected: model(shape, &variants, on_failure == "continue"),
                    label: format!("{} {on_failure} {variants:?}", shape.name),
                });
            }
            insert_rows(pool, template_id, on_failure, now, &tasks, &steps, &edges).await;
        }
    }
    // A bulk load this size needs statistics before it is queried, as
    // autovacuum would provide in production; without them the planner
    // picks nested loops over hundreds of thousands of rows.
    sqlx::query("analyze weft.tasks, weft.steps, weft.step_edges")
        .execute(pool)
        .await
        .unwrap();
    cases
}

async fn insert_rows(
    pool: &PgPool,
    template_id: i64,
    on_failure: &str,
    now: DateTime<Utc>,
    tasks: &[Uuid],
    steps: &[(Uuid, Uuid, i32, StepRow)],
    edges: &[(Uuid, Uuid, Uuid)],
) {
    sqlx::query(
        "insert into weft.tasks (id, template_id, namespace, state, on_failure, input, started_at)
         select id, $2, 'combo', 'running', $3, '{}', $4 from unnest($1::uuid[]) as t(id)",
    )
    .bind(tasks)
    .bind(template_id)
    .bind(on_failure)
    .bind(now)
    .execute(pool)
    .await
    .unwrap();
    let col = |f: fn(&(Uuid, Uuid, i32, StepRow)) -> Uuid| steps.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "insert into weft.steps (task_id, id, position, name, handler, config, state, attempts, max_attempts,
                                 retryable, next_attempt_at, enqueued_at, finished_at, timeout_ms,
                                 backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter)
         select t, i, p, 's' || p, 'builtin.noop', '{}', st, a, $10, r, n, e, f, 1000, 100, 1000, 2, 'full'
         from unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::int[], $6::bool[],
                     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
              as x(t, i, p, st, a, r, n, e, f)",
    )
    .bind(col(|s| s.0))
    .bind(col(|s| s.1))
    .bind(steps.iter().map(|s| s.2).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.0.as_str()).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.1).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.2).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.3).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.4).collect::<Vec<_>>())
    .bind(steps.iter().map(|s| s.3.5).collect::<Vec<_>>())
    .bind(MAX_ATTEMPTS)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into weft.step_edges (task_id, step_id, depends_on)
         select * from unnest($1::uuid[], $2::uuid[], $3::uuid[])",
    )
    .bind(edges.iter().map(|e| e.0).collect::<Vec<_>>())
    .bind(edges.iter().map(|e| e.1).collect::<Vec<_>>())
    .bind(edges.iter().map(|e| e.2).collect::<Vec<_>>())
    .execute(pool)
    .await
    .unwrap();
}

fn from_json<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> T {
    serde_json::from_value(value.clone()).unwrap()
}

#[tokio::test]
async fn every_state_combination_matches_the_reference_model() {
    let pool = support::fresh_pool().await;
    let now = Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap();
    let cases = insert_cases(&pool, now).await;
    let task_ids: Vec<Uuid> = cases.iter().map(|c| c.task_id).collect();

    let statuses: HashMap<Uuid, ExecutionStatus> = sqlx::query_as::<_, (Uuid, ExecutionStatus)>(
        "select task_id, execution_status from weft.task_execution_context($1, $2)",
    )
    .bind(&task_ids)
    .bind(now)
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let ready: HashMap<Uuid, bool> =
        sqlx::query_as::<_, (Uuid, bool)>("select step_id, ready from weft.step_readiness($1, $2)")
            .bind(&task_ids)
            .bind(now)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();

    // Finalization and enqueueing change state: run each in a transaction
    // that is rolled back.
    let mut tx = pool.begin().await.unwrap();
    let finals: HashMap<Uuid, TaskState> = sqlx::query_as::<_, (Uuid, TaskState)>(
        "select task_id, state from weft.finalize_tasks($1, $2)",
    )
    .bind(&task_ids)
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .into_iter()
    .collect();
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let enqueued: HashSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>("select step_id from weft.enqueue_ready_steps($1, $2)")
            .bind(&task_ids)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let queued: i64 = sqlx::query_scalar("select count(*) from pgmq.q_weft_steps_combo")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let now_enqueued: i64 = sqlx::query_scalar(
        "select count(*) from weft.steps where id = any($1) and state = 'enqueued' and msg_id is not null",
    )
    .bind(enqueued.iter().copied().collect::<Vec<_>>())
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        queued as usize,
        enqueued.len(),
        "one queue message per enqueued step"
    );
    assert_eq!(
        now_enqueued as usize,
        enqueued.len(),
        "every enqueued step moved to enqueued with its msg_id"
    );

    // A result batch's pass over its tasks (weft.advance_tasks): the enqueue
    // pass only for tasks with a step pending or waiting for a retry, then
    // finalize only for tasks with no step in flight. It must enqueue what
    // the model says and leave each task in the model's final state (a task
    // that gets a step enqueued is one the model keeps running).
    let in_flight: HashSet<Uuid> = sqlx::query_scalar(
        "select distinct task_id from weft.steps where task_id = any($1) and state = 'enqueued'",
    )
    .bind(&task_ids)
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let mut tx = pool.begin().await.unwrap();
    let advanced: serde_json::Value = sqlx::query_scalar("select weft.advance_tasks($1, $2)")
        .bind(&task_ids)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let advance_enqueued: HashSet<Uuid> = advanced["enqueued"]
        .as_array()
        .expect("advance_tasks returns the enqueued steps")
        .iter()
        .map(|e| e["step_id"].as_str().unwrap().parse().unwrap())
        .collect();
    // What it says of each task it evaluated for finishing: (state,
    // execution status, whether it moved the task).
    let advance_finalized: HashMap<Uuid, (TaskState, ExecutionStatus, bool)> =
        advanced["finalized"]
            .as_array()
            .expect("advance_tasks returns the tasks it evaluated")
            .iter()
            .map(|f| {
                (
                    from_json(&f["task_id"]),
                    (
                        from_json(&f["state"]),
                        from_json(&f["execution_status"]),
                        f["finalized"].as_bool().unwrap(),
                    ),
                )
            })
            .collect();
    let advance_states: HashMap<Uuid, TaskState> = sqlx::query_as::<_, (Uuid, TaskState)>(
        "select id, state from weft.tasks where id = any($1)",
    )
    .bind(&task_ids)
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .into_iter()
    .collect();
    // Again, over the tasks as the first pass left them: an ended task is
    // reported as it is and moved no further.
    let again: serde_json::Value = sqlx::query_scalar("select weft.advance_tasks($1, $2)")
        .bind(&task_ids)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    for f in again["finalized"].as_array().unwrap() {
        let task: Uuid = from_json(&f["task_id"]);
        let state: TaskState = from_json(&f["state"]);
        if state != TaskState::Running {
            assert_eq!(state, advance_states[&task], "{f}");
            assert_eq!(f["finalized"], json!(false), "moved twice: {f}");
        }
    }

    let mut mismatches = Vec::new();
    for case in &cases {
        let advance_actual = (
            case.step_ids
                .iter()
                .map(|s| advance_enqueued.contains(s))
                .collect::<Vec<_>>(),
            advance_states[&case.task_id],
        );
        // A task that got nothing enqueued and has no step in flight is
        // evaluated, with the model's status, and moved iff it ended (every
        // case starts running).
        let evaluated = !advance_actual.0.contains(&true) && !in_flight.contains(&case.task_id);
        let expected_report = evaluated.then(|| {
            let state = case.expected.final_state;
            (state, case.expected.status, state != TaskState::Running)
        });
        if advance_finalized.get(&case.task_id).copied() != expected_report {
            mismatches.push(format!(
                "{} (advance_tasks' report):\n  expected {:?}\n  actual   {:?}",
                case.label,
                expected_report,
                advance_finalized.get(&case.task_id)
            ));
        }
        if advance_actual != (case.expected.enqueued.clone(), case.expected.final_state) {
            mismatches.push(format!(
                "{} (advance_tasks):\n  expected enqueued {:?}, final {:?}\n  actual   enqueued {:?}, final {:?}",
                case.label,
                case.expected.enqueued,
                case.expected.final_state,
                advance_actual.0,
                advance_actual.1
            ));
        }
        let actual = Expected {
            status: statuses[&case.task_id],
            ready: case.step_ids.iter().map(|s| ready[s]).collect(),
            enqueued: case.step_ids.iter().map(|s| enqueued.contains(s)).collect(),
            final_state: finals[&case.task_id],
        };
        if actual != case.expected {
            mismatches.push(format!(
                "{}:\n  expected {:?}\n  actual   {:?}",
                case.label, case.expected, actual
            ));
        }
    }
    println!("checked {} state combinations", cases.len());
    assert!(
        cases.len() > 60_000,
        "expected the full enumeration, got {}",
        cases.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} combinations differ from the model; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Three independent steps: one complete, one permanently failed, one waiting
/// to retry with its backoff elapsed. The task cannot complete, so it is
/// blocked by failures, never "has ready steps", although the retrying step
/// is ready taken on its own.
#[tokio::test]
async fn seed_scenario_is_blocked_by_failures() {
    let pool = support::fresh_pool().await;
    let now = Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap();
    let template_id = combo_template(&pool, "seed").await;
    let task = Uuid::new_v4();
    let steps: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let rows = [
        Variant::Complete.row(now),
        Variant::Error.row(now),
        Variant::RetryDue.row(now),
    ];
    let step_rows: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (task, steps[i], i as i32, *r))
        .collect();
    insert_rows(
        &pool,
        template_id,
        "fail_fast",
        now,
        &[task],
        &step_rows,
        &[],
    )
    .await;

    let (status, ready_count, failed): (ExecutionStatus, i32, i32) = sqlx::query_as(
        "select execution_status, ready_steps, failed_steps from weft.task_execution_context($1, $2)",
    )
    .bind(vec![task])
    .bind(now)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, ExecutionStatus::BlockedByFailures);
    assert_eq!(
        (ready_count, failed),
        (1, 1),
        "the retrying step is ready-but-blocked"
    );
    let retry_ready: bool =
        sqlx::query_scalar("select ready from weft.step_readiness($1, $2) where step_id = $3")
            .bind(vec![task])
            .bind(now)
            .bind(steps[2])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(retry_ready);
    let enqueued: Vec<Uuid> =
        sqlx::query_scalar("select step_id from weft.enqueue_ready_steps($1, $2)")
            .bind(vec![task])
            .bind(now)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        enqueued.is_empty(),
        "fail_fast enqueues nothing for a blocked task"
    );
    let (state, status): (TaskState, ExecutionStatus) =
        sqlx::query_as("select state, execution_status from weft.finalize_tasks($1, $2)")
            .bind(vec![task])
            .bind(now)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state, status),
        (TaskState::Error, ExecutionStatus::BlockedByFailures)
    );
}

/// Two connections apply the same result at once: exactly one applies it,
/// the other is told it did not apply (stale), and the books hold one result.
#[tokio::test]
async fn racing_transitions_apply_exactly_once() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "race").await;
    for round in 0..20 {
        let task = Uuid::new_v4();
        let step = Uuid::new_v4();
        insert_rows(
            &pool,
            template_id,
            "fail_fast",
            now,
            &[task],
            &[(task, step, 0, Variant::Enqueued.row(now))],
            &[],
        )
        .await;
        let result = json!([{ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {"round": round} }]);
        let apply = |pool: PgPool, result: serde_json::Value| async move {
            let mut tx = pool.begin().await.unwrap();
            let outcome: String = sqlx::query_scalar("select outcome from weft.apply_results($1)")
                .bind(&result)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            outcome
        };
        let (a, b) = tokio::join!(
            tokio::spawn(apply(pool.clone(), result.clone())),
            tokio::spawn(apply(pool.clone(), result.clone()))
        );
        let mut outcomes = vec![a.unwrap(), b.unwrap()];
        outcomes.sort();
        assert_eq!(
            outcomes,
            vec!["complete".to_owned(), "stale".to_owned()],
            "round {round}"
        );
        let applied: i64 = sqlx::query_scalar(
            "select count(*) from weft.step_transitions where step_id = $1 and from_state = 'enqueued'",
        )
        .bind(step)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(applied, 1);
    }
}

/// Both parents of a join complete at the same instant, applied by two
/// connections (two orchestrators): the join is enqueued exactly once.
#[tokio::test]
async fn join_is_enqueued_once_when_parents_finish_together() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "join").await;
    for round in 0..30 {
        let task = Uuid::new_v4();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let rows = vec![
            (task, ids[0], 0, Variant::Enqueued.row(now)),
            (task, ids[1], 1, Variant::Enqueued.row(now)),
            (task, ids[2], 2, Variant::Pending.row(now)),
        ];
        insert_rows(
            &pool,
            template_id,
            "fail_fast",
            now,
            &[task],
            &rows,
            &[(task, ids[2], ids[0]), (task, ids[2], ids[1])],
        )
        .await;
        let apply = |pool: PgPool, step: Uuid| async move {
            let mut tx = pool.begin().await.unwrap();
            let result = json!([{ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {} }]);
            sqlx::query("select * from weft.apply_results($1)")
                .bind(&result)
                .execute(&mut *tx)
                .await
                .unwrap();
            let enqueued: Vec<Uuid> =
                sqlx::query_scalar("select step_id from weft.enqueue_ready_steps($1)")
                    .bind(vec![task])
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
            tx.commit().await.unwrap();
            enqueued
        };
        let (a, b) = tokio::join!(
            tokio::spawn(apply(pool.clone(), ids[0])),
            tokio::spawn(apply(pool.clone(), ids[1]))
        );
        let total: Vec<Uuid> = a.unwrap().into_iter().chain(b.unwrap()).collect();
        assert_eq!(
            total,
            vec![ids[2]],
            "round {round}: the join is enqueued by exactly one of the two"
        );
        let messages: i64 = sqlx::query_scalar(
            "select count(*) from pgmq.q_weft_steps_combo where message ->> 'step_id' = $1::text",
        )
        .bind(ids[2])
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(messages, 1);
        let deps: serde_json::Value = sqlx::query_scalar(
            "select message -> 'dependencies' from pgmq.q_weft_steps_combo where message ->> 'step_id' = $1::text",
        )
        .bind(ids[2])
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            deps,
            json!({"s0": {}, "s1": {}}),
            "the join's message carries both parents' outputs"
        );
    }
}

/// Duplicates of one result in one batch: the first applies, the later one
/// is fenced off and recorded with the state the first left behind.
#[tokio::test]
async fn a_duplicate_in_the_same_batch_is_stale() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "dup").await;
    let (task, step) = (Uuid::new_v4(), Uuid::new_v4());
    insert_rows(
        &pool,
        template_id,
        "fail_fast",
        now,
        &[task],
        &[(task, step, 0, Variant::Enqueued.row(now))],
        &[],
    )
    .await;
    let one = json!({ "v": 1, "task_id": task, "step_id": step, "attempt": 1, "status": "success", "output": {} });
    let outcomes: Vec<String> = sqlx::query_scalar("select outcome from weft.apply_results($1)")
        .bind(json!([one, one]))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(outcomes, ["complete", "stale"]);
    let recorded: Vec<(Option<String>, Option<i32>)> = sqlx::query_as(
        "select step_state, step_attempt from weft.stale_results where step_id = $1",
    )
    .bind(step)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(recorded, [(Some("complete".to_owned()), Some(1))]);
}

/// One retry-scheduler iteration in one statement: the due retry is claimed
/// and enqueued, the one due in an hour is left and gives the next due time;
/// a second iteration finds nothing due.
#[tokio::test]
async fn dispatch_due_retries_takes_what_is_due_and_says_when_next() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "retry").await;
    let (due_task, due_step) = (Uuid::new_v4(), Uuid::new_v4());
    let (later_task, later_step) = (Uuid::new_v4(), Uuid::new_v4());
    insert_rows(
        &pool,
        template_id,
        "fail_fast",
        now,
        &[due_task, later_task],
        &[
            (due_task, due_step, 0, Variant::RetryDue.row(now)),
            (later_task, later_step, 0, Variant::RetryLater.row(now)),
        ],
        &[],
    )
    .await;
    let dispatch = || async {
        let sqlx::types::Json(d): sqlx::types::Json<serde_json::Value> =
            sqlx::query_scalar("select weft.dispatch_due_retries(100)")
                .fetch_one(&pool)
                .await
                .unwrap();
        d
    };
    let first = dispatch().await;
    assert_eq!(first["claimed"], 1, "{first}");
    assert_eq!(first["enqueued"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["enqueued"][0]["step_id"], json!(due_step), "{first}");
    assert_eq!(first["finalized"], json!([]), "{first}");
    let next = first["next_due_in_s"].as_f64().unwrap();
    assert!((3500.0..=3600.0).contains(&next), "next retry in {next} s");
    let state: String = sqlx::query_scalar("select state from weft.steps where id = $1")
        .bind(due_step)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "enqueued");

    let second = dispatch().await;
    assert_eq!(second["claimed"], 0, "{second}");
    assert_eq!(second["enqueued"], json!([]), "{second}");
}

/// A result batch dispatches the retries due by then along with its own
/// work: the due one is enqueued (and counted), the one due in an hour is
/// left to the scheduler, and the batch's own task is not claimed twice.
#[tokio::test]
async fn a_result_batch_takes_the_retries_due_along() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "ride").await;
    let (busy_task, busy_step) = (Uuid::new_v4(), Uuid::new_v4());
    let (due_task, due_step) = (Uuid::new_v4(), Uuid::new_v4());
    let (later_task, later_step) = (Uuid::new_v4(), Uuid::new_v4());
    insert_rows(
        &pool,
        template_id,
        "fail_fast",
        now,
        &[busy_task, due_task, later_task],
        &[
            (busy_task, busy_step, 0, Variant::Enqueued.row(now)),
            (due_task, due_step, 0, Variant::RetryDue.row(now)),
            (later_task, later_step, 0, Variant::RetryLater.row(now)),
        ],
        &[],
    )
    .await;
    let result = json!([{ "v": 1, "task_id": busy_task, "step_id": busy_step, "attempt": 1,
                          "status": "success", "output": {} }]);
    let sqlx::types::Json(batch): sqlx::types::Json<serde_json::Value> =
        sqlx::query_scalar("select weft.collect_results($1, '{}')")
            .bind(&result)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(batch["applied"][0]["outcome"], "complete", "{batch}");
    assert_eq!(batch["retries"], 1, "{batch}");
    let enqueued: Vec<&serde_json::Value> = batch["enqueued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["step_id"])
        .collect();
    assert_eq!(enqueued, [&json!(due_step)], "{batch}");
    // The finished task is evaluated once, as the batch's own.
    let finalized: Vec<&serde_json::Value> = batch["finalized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["task_id"])
        .collect();
    assert_eq!(finalized, [&json!(busy_task)], "{batch}");
    let states: Vec<(Uuid, String, i32)> =
        sqlx::query_as("select id, state, attempts from weft.steps order by state, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let state_of = |id: Uuid| {
        states
            .iter()
            .find(|(s, _, _)| *s == id)
            .map(|(_, state, attempts)| (state.as_str(), *attempts))
    };
    assert_eq!(state_of(busy_step), Some(("complete", 1)));
    assert_eq!(state_of(due_step), Some(("enqueued", 2)));
    assert_eq!(state_of(later_step), Some(("waiting_retry", 1)));
    let queued: i64 = sqlx::query_scalar(
        "select count(*) from pgmq.q_weft_steps_combo where (message ->> 'step_id')::uuid = $1",
    )
    .bind(due_step)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
}

/// A retry due on a task of the batch itself is enqueued once, as the
/// batch's own work: the claim leaves the batch's tasks out, so the step is
/// neither sent twice nor counted as a claimed retry.
#[tokio::test]
async fn a_due_retry_on_the_batchs_own_task_is_enqueued_once() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "own").await;
    let (task, done_step, retry_step) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    insert_rows(
        &pool,
        template_id,
        "continue",
        now,
        &[task],
        &[
            (task, done_step, 0, Variant::Enqueued.row(now)),
            (task, retry_step, 1, Variant::RetryDue.row(now)),
        ],
        &[],
    )
    .await;
    let result = json!([{ "v": 1, "task_id": task, "step_id": done_step, "attempt": 1,
                          "status": "success", "output": {} }]);
    let sqlx::types::Json(batch): sqlx::types::Json<serde_json::Value> =
        sqlx::query_scalar("select weft.collect_results($1, '{}')")
            .bind(&result)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(batch["retries"], 0, "{batch}");
    let enqueued: Vec<&serde_json::Value> = batch["enqueued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["step_id"])
        .collect();
    assert_eq!(enqueued, [&json!(retry_step)], "{batch}");
    let (state, attempts): (String, i32) =
        sqlx::query_as("select state, attempts from weft.steps where id = $1")
            .bind(retry_step)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("enqueued", 2));
    let queued: i64 = sqlx::query_scalar(
        "select count(*) from pgmq.q_weft_steps_combo where (message ->> 'step_id')::uuid = $1",
    )
    .bind(retry_step)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
}

async fn combo_template(pool: &PgPool, name: &str) -> i64 {
    sqlx::query("select weft.ensure_namespace('combo')")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar(
        "insert into weft.templates (namespace, name, version, definition) values ('combo', $1, 1, '{}') returning id",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A result batch evaluates for finishing only the tasks with no step in
/// flight: a task whose other step still runs is left alone (it cannot be
/// finished), and is finished by the batch that completes its last step.
#[tokio::test]
async fn a_task_with_a_step_in_flight_is_not_evaluated_for_finishing() {
    let pool = support::fresh_pool().await;
    let now = Utc::now();
    let template_id = combo_template(&pool, "inflight").await;
    let (task, first, second) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    insert_rows(
        &pool,
        template_id,
        "fail_fast",
        now,
        &[task],
        &[
            (task, first, 0, Variant::Enqueued.row(now)),
            (task, second, 1, Variant::Enqueued.row(now)),
        ],
        &[],
    )
    .await;
    let collect = |step: Uuid| {
        let pool = pool.clone();
        async move {
            let result = json!([{ "v": 1, "task_id": task, "step_id": step, "attempt": 1,
                                  "status": "success", "output": {} }]);
            let sqlx::types::Json(batch): sqlx::types::Json<serde_json::Value> =
                sqlx::query_scalar("select weft.collect_results($1, '{}')")
                    .bind(&result)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            batch
        }
    };
    let task_state = || async {
        sqlx::query_scalar::<_, String>("select state from weft.tasks where id = $1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    let batch = collect(first).await;
    assert_eq!(batch["applied"][0]["outcome"], "complete", "{batch}");
    assert_eq!(batch["finalized"], json!([]), "{batch}");
    assert_eq!(task_state().await, "running");

    let batch = collect(second).await;
    assert_eq!(batch["applied"][0]["outcome"], "complete", "{batch}");
    assert_eq!(batch["finalized"][0]["task_id"], json!(task), "{batch}");
    assert_eq!(batch["finalized"][0]["finalized"], json!(true), "{batch}");
    assert_eq!(task_state().await, "complete");
}
