"""Send a few sample events to a running ingestor with Python grpcio (`make up` runs this).

Usage: send_sample.py <host:port> [api-key] [--ca CA.pem]

The key may also come from CHUTE_API_KEY (kept off the command line). With --ca the call goes
over TLS and the ingestor's certificate must be issued by that CA (`CHUTE_SECURE=1 make up`
writes it to .local/secure/ca.pem).
"""
import argparse
import os
import sys
import tempfile
import time
import uuid

from grpc_tools import protoc
import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stubs():
    out = tempfile.mkdtemp(prefix="chute-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", "chute/v1/ingest.proto"])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    sys.path.insert(0, out)
    from chute.v1 import ingest_pb2, ingest_pb2_grpc
    return ingest_pb2, ingest_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description="Send five sample events to a Chute ingestor.")
    parser.add_argument("target", help="ingestor gRPC address, host:port")
    parser.add_argument("api_key", nargs="?", default=os.environ.get("CHUTE_API_KEY", ""),
                        help="API key (default: $CHUTE_API_KEY; none when empty)")
    parser.add_argument("--ca", help="PEM CA of the ingestor's TLS certificate: call over TLS")
    args = parser.parse_args()
    target, api_key = args.target, args.api_key
    pb, rpc = stubs()
    events = []
    for i in range(5):
        event = pb.Event(tenant="demo", name="llm.request", session_id=f"conv-{i % 2}", user_id=f"user-{i % 3}")
        event.time.GetCurrentTime()
        event.attributes["model"] = "chute-small" if i % 2 else "chute-large"
        event.metrics["tokens_in"] = 100 + i
        event.metrics["latency_ms"] = 40.0 + 7 * i
        event.metrics["cost_usd"] = 0.0004 * (i + 1)
        events.append(event)
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    key = f"make-up-{uuid.uuid4()}"
    if args.ca:
        with open(args.ca, "rb") as ca:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca.read()))
    else:
        channel = grpc.insecure_channel(target)
    stub = rpc.IngestServiceStub(channel)
    request = pb.PublishRequest(events=events, idempotency_key=key)
    # UNAVAILABLE means "not stored, retry": a JetStream that is still loading a large stream
    # can be slow for a few seconds after start. The same idempotency key makes retries safe.
    deadline = time.monotonic() + 60
    while True:
        try:
            response = stub.Publish(request, metadata=metadata, timeout=10)
            break
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            print(f"  ingestor answered UNAVAILABLE ({err.details()}); retrying with the same key")
            time.sleep(1)
    print(f"sent 5 sample events (idempotency_key={key}): accepted={response.accepted} rejected={response.rejected}")
    for error in response.errors:
        print(f"  event {error.index}: {error.field}: {error.reason}")
    if response.accepted != 5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
