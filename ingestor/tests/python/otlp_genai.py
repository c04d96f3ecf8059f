"""GenAI telemetry sent to Chute by the OpenTelemetry Python SDK and its OTLP exporters.

Spans are shaped as the official GenAI instrumentations shape them (opentelemetry-instrumentation-
openai-v2 and the GenAI semantic conventions): a CLIENT span named "{operation} {model}" with
gen_ai.operation.name, gen_ai.provider.name, gen_ai.request.model, gen_ai.response.model,
gen_ai.response.finish_reasons, gen_ai.usage.* tokens, gen_ai.conversation.id, and, with content
capture, gen_ai.*.message events. Log records are GenAI events sent through the logs exporter.

The exporter is configured only from the environment, as any SDK user would do it:
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES.

Usage: otlp_genai.py traces|logs grpc|http COUNT PREFIX
Prints one JSON line: what was sent (counts and token sums per model) and the export result.
"""

import json
import logging
import sys

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

MODELS = [("openai", "gpt-4o", "gpt-4o-2024-08-06"), ("anthropic", "claude-sonnet-4", "claude-sonnet-4")]


def tokens(i):
    """Deterministic usage of the i-th call: input includes the cached tokens."""
    cached = (i % 3) * 10
    return {"input": 100 + i, "output": 10 + i % 7, "cached": cached}


def send_traces(protocol, count, prefix):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": f"{prefix}-chatbot"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai_v2", "2.1b0")
    sent = {}
    errors = 0
    for i in range(count):
        provider_name, request_model, response_model = MODELS[i % len(MODELS)]
        usage = tokens(i)
        with tracer.start_as_current_span(f"chat {request_model}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.provider.name", provider_name)
            span.set_attribute("gen_ai.request.model", request_model)
            span.set_attribute("gen_ai.request.temperature", 0.2)
            span.set_attribute("gen_ai.conversation.id", f"{prefix}-conv-{i % 4}")
            span.set_attribute("server.address", "api.example.test")
            span.add_event("gen_ai.user.message", {"content": f"question {i}"})
            span.set_attribute("gen_ai.response.model", response_model)
            span.set_attribute("gen_ai.response.id", f"resp-{prefix}-{i}")
            span.set_attribute("gen_ai.response.finish_reasons", ["stop"])
            span.set_attribute("gen_ai.usage.input_tokens", usage["input"])
            span.set_attribute("gen_ai.usage.output_tokens", usage["output"])
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage["cached"])
            span.add_event("gen_ai.choice", {"index": 0, "finish_reason": "stop"})
            if i % 10 == 9:
                span.set_attribute("error.type", "RateLimitError")
                span.set_status(Status(StatusCode.ERROR, "rate limited"))
                errors += 1
        model = sent.setdefault(response_model, {"spans": 0, "input": 0, "output": 0, "cached": 0})
        model["spans"] += 1
        for key in ("input", "output", "cached"):
            model[key] += usage[key]
    spans = memory.get_finished_spans()
    # One export of every span, as a BatchSpanProcessor would send them.
    result = OTLPSpanExporter().export(spans)
    return {"sent": len(spans), "errors": errors, "by_model": sent, "result": result.name}


def send_logs(protocol, count, prefix):
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    memory = InMemoryLogExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": f"{prefix}-chatbot"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    logger = logging.getLogger(f"chute.{prefix}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(LoggingHandler(logger_provider=provider))
    for i in range(count):
        logger.warning(
            "model fallback %d",
            i,
            extra={"session.id": f"{prefix}-conv-{i % 4}", "gen_ai.usage.input_tokens": 5, "attempt": i},
        )
    records = memory.get_finished_logs()
    result = OTLPLogExporter().export(records)
    return {"sent": len(records), "result": result.name}


def main():
    signal, protocol, count, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    summary = send_traces(protocol, count, prefix) if signal == "traces" else send_logs(protocol, count, prefix)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
