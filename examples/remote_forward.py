"""Let the remote host reach a service running here: a remote forward.

    python examples/remote_forward.py                   # against the built-in test server
    python examples/remote_forward.py --host login.example.org --user clown

A job on the cluster that must report back to a small HTTP server on your
workstation (a progress collector, a license server, a notebook) cannot
connect to it directly. ``forward_remote`` asks the SSH server to listen on
a port of its own and carries every connection to it back to the service
here. The forward is asked for again whenever the executor reconnects.
The remote side needs ``python3`` for this example's client.
"""

import http.server
import threading

import _target

from paramiko_executor import CommandExecutionFailure, ExecutorFailure, SSHExecutor

#: What the remote host runs to reach the forwarded port: a plain HTTP POST.
CLIENT = ("python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("
          "\"http://localhost:%d/progress\", data=b\"step 3 of 5\", timeout=10).read().decode())'")


class Collector(http.server.BaseHTTPRequestHandler):
    """The service here: takes a progress report, answers with a receipt."""

    reports: list = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        report = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.reports.append(report)
        body = f"received {report!r}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    args = _target.parser(__doc__.splitlines()[0]).parse_args()
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    here = collector.server_address[1]
    try:
        with _target.target(args) as parameters, SSHExecutor(**parameters) as executor, \
                executor.forward_remote(0, here) as tunnel:
            host, port = tunnel.remote_address
            print(f"the remote host's {host}:{port} now reaches 127.0.0.1:{here} here")
            result = executor.run_command(CLIENT % port, timeout=30)
            print(f"the remote command got: {result.stdout.strip()}")
            print(f"the collector here got: {Collector.reports}")
    except (ExecutorFailure, CommandExecutionFailure) as failure:
        print(f"the remote forward failed: {failure}")
        return 1
    finally:
        collector.shutdown()
        collector.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
