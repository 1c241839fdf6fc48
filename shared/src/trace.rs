//! Trace context in queue messages: a W3C `traceparent` carried inside step
//! and result messages, so one task is one trace across orchestrator and
//! workers. When no OpenTelemetry layer is installed, spans have no context
//! and nothing is carried.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde_json::{Value, json};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span's context as `{"traceparent": "00-<trace>-<span>-<flags>"}`,
/// or `None` when the span is not recorded by OpenTelemetry.
pub fn inject(span: &tracing::Span) -> Option<Value> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    Some(json!({
        "traceparent": format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    }))
}

/// Parses a carried `traceparent`; `None` for anything malformed.
pub fn extract(carrier: Option<&Value>) -> Option<SpanContext> {
    let header = carrier?.get("traceparent")?.as_str()?;
    let mut parts = header.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00"
        || parts.next().is_some()
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Makes the carried context the parent of `span` (no-op when absent).
pub fn set_parent(span: &tracing::Span, carrier: Option<&Value>) {
    if let Some(remote) = extract(carrier) {
        let parent = opentelemetry::Context::new().with_remote_span_context(remote);
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_garbage() {
        let carrier =
            json!({ "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" });
        let context = extract(Some(&carrier)).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        for bad in [
            json!({}),
            json!({ "traceparent": 7 }),
            json!({ "traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" }),
            json!({ "traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01" }),
            json!({ "traceparent": "00-xyz-00f067aa0ba902b7-01" }),
        ] {
            assert!(extract(Some(&bad)).is_none(), "{bad}");
        }
        assert!(inject(&tracing::Span::none()).is_none());
    }
}
