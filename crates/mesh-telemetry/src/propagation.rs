//! W3C trace context (`traceparent`, `tracestate`) across process boundaries: in gRPC metadata
//! for calls, and in a string map for events that travel inside messages (a channel server's
//! fan-out to gateways).
//!
//! Without tracing (no OTLP endpoint), spans carry no OpenTelemetry context and nothing is
//! written: an untraced call costs a lookup and carries no extra bytes.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes the current span's trace context into a call's metadata.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the trace context in a call's metadata, if there is one.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    // Fails only when no OpenTelemetry layer is installed: then there is no trace to join.
    let _ = span.set_parent(cx);
}

/// Writes the current span's trace context into `map` (an internal message's field).
pub fn inject_map(map: &mut HashMap<String, String>) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, map);
}

/// Makes `span` a child of the trace context in `map`, if there is one.
pub fn set_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    if map.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(map);
    let _ = span.set_parent(cx);
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Trace-context keys and values are ASCII by the W3C spec; anything else is dropped.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_trace_nothing_is_written() {
        let mut metadata = MetadataMap::new();
        inject_metadata(&mut metadata);
        assert!(metadata.is_empty());
        let mut map = HashMap::new();
        inject_map(&mut map);
        assert!(map.is_empty());
    }

    #[test]
    fn metadata_carries_a_traceparent_both_ways() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut metadata = MetadataMap::new();
        MetadataInjector(&mut metadata).set("traceparent", traceparent.to_string());
        let extractor = MetadataExtractor(&metadata);
        assert_eq!(extractor.get("traceparent"), Some(traceparent));
        assert_eq!(extractor.keys(), vec!["traceparent"]);
        let cx = TraceContextPropagator::new().extract(&extractor);
        use opentelemetry::trace::TraceContextExt;
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
