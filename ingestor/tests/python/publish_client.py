"""A client the team did not write: Python grpcio, stubs generated from proto/ at run time.

Usage: publish_client.py <proto-root> <host:port>
Publishes 5 events (one invalid) with an idempotency key over unary Publish and 2 requests
over PublishStream, checks the answers, and prints a JSON summary.
"""
import json
import sys
import tempfile

from grpc_tools import protoc
import grpc


def main() -> None:
    proto_root, target = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp(prefix="chute-py-")
    include = protoc.__file__.rsplit("/", 1)[0] + "/_proto"
    code = protoc.main([
        "protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
        "chute/v1/ingest.proto",
    ])
    assert code == 0, f"protoc failed: {code}"
    sys.path.insert(0, out)
    from chute.v1 import ingest_pb2, ingest_pb2_grpc  # noqa: E402

    channel = grpc.insecure_channel(target)
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    events = []
    for i in range(5):
        event = ingest_pb2.Event(tenant="pyco", name="py.event", session_id=f"s{i % 2}", user_id="u1")
        event.time.GetCurrentTime()
        event.metrics["latency_ms"] = 10.0 + i
        event.attributes["client"] = "grpcio"
        events.append(event)
    events[3].name = "bad name"
    response = stub.Publish(ingest_pb2.PublishRequest(events=events, idempotency_key="py-1"), timeout=10)
    assert (response.accepted, response.rejected) == (4, 1), response
    assert response.errors[0].index == 3 and response.errors[0].field == "name", response

    requests = [ingest_pb2.PublishRequest(events=events[:2], idempotency_key=f"py-stream-{i}") for i in range(2)]
    answers = [r.accepted for r in stub.PublishStream(iter(requests), timeout=10)]
    assert answers == [2, 2], answers
    print(json.dumps({"accepted": response.accepted, "rejected": response.rejected, "stream": answers}))


if __name__ == "__main__":
    main()
