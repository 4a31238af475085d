//! The `opentelemetry` feature: task spans exported through tracing-opentelemetry, parented by
//! the message's W3C trace context.
//!
//! The application installs a `tracing_opentelemetry` layer with its own exporter; without
//! one, these functions find no OpenTelemetry span and the worker keeps its own ids.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::trace::TraceContext;

/// Sets `span`'s OpenTelemetry parent from the message's context, and returns the exported
/// span's own context (`None` when the span is not exported).
pub(super) fn parent_span(
    span: &Span,
    parent: Option<TraceContext>,
    tracestate: Option<&str>,
) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    if let Some(parent) = parent {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id_u128().to_be_bytes()),
            SpanId::from_bytes(parent.span_id_u64().to_be_bytes()),
            TraceFlags::new(parent.flags()),
            true,
            state,
        );
        // Fails only when no OpenTelemetry layer sees the span: then nothing is exported.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    own(span)
}

/// The context of the current span, when it is exported: the parent of a message a producer
/// sends from inside it.
pub(super) fn current() -> Option<TraceContext> {
    let span = Span::current();
    if span.is_disabled() {
        return None;
    }
    own(&span)
}

fn own(span: &Span) -> Option<TraceContext> {
    let cx = span.context();
    let otel = cx.span();
    let context = otel.span_context();
    if !context.is_valid() {
        return None;
    }
    TraceContext::from_parts(
        u128::from_be_bytes(context.trace_id().to_bytes()),
        u64::from_be_bytes(context.span_id().to_bytes()),
        context.trace_flags().to_u8(),
    )
}
