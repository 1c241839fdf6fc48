//! One task is one trace: spans from task creation, each enqueue, each
//! handler run and each result applied share the task's trace id and nest
//! under the task's root span, across the orchestrator and the worker (the
//! context travels inside the queue messages).

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use shared::TaskState;
use tracing_subscriber::layer::SubscriberExt;

use crate::fleet::{self, Fleet};
use crate::support;

#[tokio::test]
async fn a_task_is_one_trace_across_processes_roles() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("weft-test")));
    // The test runtime is single-threaded, so every spawned loop records here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let pool = support::fresh_pool().await;
    fleet::register(
        &pool,
        "namespace: traced\nname: diamond\nversion: 1\nsteps:\n  - { name: a, handler: builtin.noop }\n  - { name: b, handler: builtin.noop, depends_on: [a] }\n  - { name: c, handler: builtin.noop, depends_on: [a] }\n  - { name: d, handler: builtin.noop, depends_on: [b, c] }\n",
    )
    .await;
    let fleet = Fleet::start(&pool, 1, &["traced"]);
    let id = fleet::create(&pool, "traced", "diamond", json!({})).await;
    let other = fleet::create(&pool, "traced", "diamond", json!({})).await;
    assert_eq!(
        fleet::wait_final(&pool, id, Duration::from_secs(30)).await,
        TaskState::Complete
    );
    assert_eq!(
        fleet::wait_final(&pool, other, Duration::from_secs(30)).await,
        TaskState::Complete
    );
    fleet.stop().await;
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let task_of = |span: &opentelemetry_sdk::trace::SpanData| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == "task.id")
            .map(|kv| kv.value.to_string())
    };
    let ours: Vec<_> = spans
        .iter()
        .filter(|s| task_of(s).as_deref() == Some(&id.to_string()))
        .collect();
    let names = |name: &str| ours.iter().filter(|s| s.name == name).count();
    assert_eq!(names("task.create"), 1);
    assert_eq!(names("step.enqueue"), 4, "one per step");
    assert_eq!(names("step.run"), 4, "one per handler run");
    assert_eq!(names("result.apply"), 4, "one per result");

    let root = ours.iter().find(|s| s.name == "task.create").unwrap();
    assert_eq!(
        root.parent_span_id,
        SpanId::INVALID,
        "task.create is the root"
    );
    let trace: TraceId = root.span_context.trace_id();
    assert!(
        ours.iter().all(|s| s.span_context.trace_id() == trace),
        "every span of the task shares its trace id"
    );
    let other_root = spans
        .iter()
        .find(|s| s.name == "task.create" && task_of(s).as_deref() == Some(&other.to_string()))
        .unwrap();
    assert_ne!(
        other_root.span_context.trace_id(),
        trace,
        "another task is another trace"
    );

    let by_id: HashMap<SpanId, &&opentelemetry_sdk::trace::SpanData> =
        ours.iter().map(|s| (s.span_context.span_id(), s)).collect();
    let root_id = root.span_context.span_id();
    for span in &ours {
        match span.name.as_ref() {
            "step.enqueue" | "step.run" => assert_eq!(
                span.parent_span_id, root_id,
                "{} nests under the task",
                span.name
            ),
            "result.apply" => {
                let parent = by_id
                    .get(&span.parent_span_id)
                    .expect("result.apply has a parent in the trace");
                assert_eq!(
                    parent.name, "step.run",
                    "a result nests under the handler run that produced it"
                );
            }
            _ => {}
        }
    }
}
