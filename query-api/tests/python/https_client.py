"""A client the team did not write: Python's http.client and ssl over HTTPS / mutual TLS.

Usage: https_client.py <host> <port>
Reads one JSON command per line on stdin and answers one JSON line on stdout per command:
  {"conn": "a", "ca": "/ca.pem", "cert": "/c.crt", "key_file": "/c.key", "path": "/healthz",
   "headers": {"authorization": "Bearer ..."}}
sends one GET on the named connection (opened on first use and kept alive, so later commands
reuse its socket). Without "ca" the connection is plaintext. The answer is
{"ok": true, "status": 200, "body": "...", "retry_after": null, "reused": false, "peer_cert": "<hex DER>"}
or {"ok": false, "error": "..."} (the connection is then forgotten).
"""
import http.client
import json
import ssl
import sys


def open_connection(host, port, command):
    if "ca" not in command:
        return http.client.HTTPConnection(host, port, timeout=10)
    context = ssl.create_default_context(cafile=command["ca"])
    context.check_hostname = False  # the certificate is checked against the CA, names aside
    if "cert" in command:
        context.load_cert_chain(command["cert"], command["key_file"])
    return http.client.HTTPSConnection(host, port, context=context, timeout=10)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    connections = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        name = command.get("conn", "default")
        connection = connections.get(name)
        reused = connection is not None and connection.sock is not None
        if connection is None:
            connection = connections[name] = open_connection(host, port, command)
        socket_before = connection.sock
        try:
            connection.request("GET", command.get("path", "/healthz"), headers=command.get("headers", {}))
            response = connection.getresponse()
            body = response.read().decode("utf-8", "replace")
            peer = connection.sock.getpeercert(binary_form=True) if isinstance(connection.sock, ssl.SSLSocket) else None
            answer = {
                "ok": True,
                "status": response.status,
                "body": body,
                "retry_after": response.getheader("retry-after"),
                "reused": reused and connection.sock is socket_before,
                "peer_cert": peer.hex() if peer else None,
            }
        except (OSError, http.client.HTTPException) as err:
            connections.pop(name, None)
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
