"""Reach a service that only the login node can see, through a local port.

    python examples/database_tunnel.py                  # built-in test server, stand-in service
    python examples/database_tunnel.py --host login.example.org --user clown \
        --service db.internal:5432

A database, a web dashboard or a license server often listens where only the
login node can reach it. ``forward_local`` opens a port here whose clients
reach that service through the executor's one SSH connection (no second
login, no ``ssh -L`` on the side), and ``open_connection`` gives one such
connection as a socket, for libraries that accept one.

Without ``--service`` a small HTTP server on 127.0.0.1 stands in for the
database; it must be reachable from the SSH server, as it is from the
built-in test server (or an sshd on this machine).
"""

import http.client
import http.server
import threading
import urllib.request
from typing import Tuple

import _target

from paramiko_executor import ExecutorFailure, SSHExecutor


class StandIn(http.server.BaseHTTPRequestHandler):
    """The "database": answers every GET with one line."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = f"rows for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # keep the example's output to its own lines


def service(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    parser = _target.parser(__doc__.splitlines()[0])
    parser.add_argument("--service", type=service, metavar="HOST:PORT",
                        help="the service as the SSH server sees it (default: a stand-in)")
    args = parser.parse_args()
    stand_in = None
    if args.service is None:
        stand_in = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
        threading.Thread(target=stand_in.serve_forever, daemon=True).start()
        args.service = ("127.0.0.1", stand_in.server_address[1])
    host, port = args.service
    try:
        with _target.target(args) as parameters, SSHExecutor(**parameters) as executor, \
                executor.forward_local(port, host) as tunnel:
            here = f"{tunnel.local_address[0]}:{tunnel.local_address[1]}"
            print(f"{host}:{port} is reachable here at {here}")
            if stand_in is None:
                with executor.open_connection(host, port, timeout=10):
                    print(f"{host}:{port} accepted a connection through the login node")
                return 0
            # Any client that speaks to a host and port works unchanged: here, urllib.
            with urllib.request.urlopen(f"http://{here}/customers", timeout=10) as reply:
                print(f"GET /customers through the tunnel: {reply.status} "
                      f"{reply.read().decode().strip()}")
            # A library that takes a ready socket gets one from open_connection.
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.sock = executor.open_connection(host, port, timeout=10)  # type: ignore[assignment]
            connection.request("GET", "/orders")
            answer = connection.getresponse()
            print(f"GET /orders over open_connection: {answer.status} "
                  f"{answer.read().decode().strip()}")
            connection.close()
            print(f"commands still share the connection: {executor.run_command('echo ok').stdout}",
                  end="")
    except ExecutorFailure as failure:
        print(f"the tunnel failed: {failure}")
        return 1
    finally:
        if stand_in is not None:
            stand_in.shutdown()
            stand_in.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
