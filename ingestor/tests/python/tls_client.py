"""A client the team did not write: Python grpcio over TLS / mutual TLS / plaintext.

Usage: tls_client.py <proto-root> <host:port>
Reads one JSON command per line on stdin and answers one JSON line on stdout per command:
  {"channel": "a", "ca": "/ca.pem", "cert": "/c.crt", "key_file": "/c.key", "api_key": "...",
   "tenant": "acme", "idempotency_key": "idem-1"}
publishes one event on the named channel (created on first use and kept, so later commands
reuse its connection). Without "ca" the channel is plaintext. The answer is
{"ok": true, "accepted": n} or {"ok": false, "code": "UNAVAILABLE", "details": "..."}.
"""
import json
import sys
import tempfile

from grpc_tools import protoc
import grpc


def stubs(proto_root):
    out = tempfile.mkdtemp(prefix="chute-py-tls-")
    include = protoc.__file__.rsplit("/", 1)[0] + "/_proto"
    code = protoc.main([
        "protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
        "chute/v1/ingest.proto",
    ])
    assert code == 0, f"protoc failed: {code}"
    sys.path.insert(0, out)
    from chute.v1 import ingest_pb2, ingest_pb2_grpc  # noqa: E402
    return ingest_pb2, ingest_pb2_grpc


def read(path):
    with open(path, "rb") as f:
        return f.read()


def open_channel(target, command):
    # A channel of its own connections: a new channel is a new TLS handshake.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]
    if "ca" not in command:
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(command["ca"]),
        private_key=read(command["key_file"]) if "key_file" in command else None,
        certificate_chain=read(command["cert"]) if "cert" in command else None,
    )
    return grpc.secure_channel(target, credentials, options=options)


def main() -> None:
    proto_root, target = sys.argv[1], sys.argv[2]
    ingest_pb2, ingest_pb2_grpc = stubs(proto_root)
    channels = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        name = command.get("channel", "default")
        if name not in channels:
            channels[name] = open_channel(target, command)
        stub = ingest_pb2_grpc.IngestServiceStub(channels[name])
        event = ingest_pb2.Event(tenant=command.get("tenant", ""), name="tls.event", user_id="u1")
        event.time.GetCurrentTime()
        event.attributes["client"] = "grpcio-tls"
        metadata = [("authorization", f"Bearer {command['api_key']}")] if "api_key" in command else None
        request = ingest_pb2.PublishRequest(events=[event], idempotency_key=command.get("idempotency_key", ""))
        try:
            response = stub.Publish(request, timeout=10, metadata=metadata)
            answer = {"ok": True, "accepted": response.accepted, "rejected": response.rejected}
        except grpc.RpcError as err:
            answer = {"ok": False, "code": err.code().name, "details": err.details()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
