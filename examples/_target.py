"""Where the examples run: a host named on the command line, or the built-in test server.

Not part of the library, just what the examples share: with no ``--host`` an
example starts ``paramiko_executor.testing.SSHTestServer`` on 127.0.0.1, so it
runs wherever ``pip install paramiko-executor`` ran; with ``--host`` (and
``--user``, ``--key``, ...) it talks to that host instead.
"""

import argparse
import contextlib
import sys
from typing import Any, Dict, Iterator

from paramiko_executor.testing import SSHTestServer


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options that name a real host."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--host", help="a real host (default: start the built-in test server)")
    result.add_argument("--port", type=int, help="SSH port (default: 22 or ssh_config)")
    result.add_argument("--user", help="login name")
    result.add_argument("--key", action="append", help="private key file (repeatable)")
    result.add_argument("--known-hosts", help="known_hosts file (default: ~/.ssh/known_hosts)")
    return result


@contextlib.contextmanager
def target(args: argparse.Namespace, **server_options: Any) -> Iterator[Dict[str, Any]]:
    """Yield ``SSHExecutor`` keyword arguments for ``args.host``.

    Without ``--host``, start an ``SSHTestServer(**server_options)`` for the
    duration and yield the arguments that reach it.
    """
    if args.host is not None:
        given = {
            "host": args.host,
            "port": args.port,
            "username": args.user,
            "client_keys": args.key,
            "known_hosts": args.known_hosts,
        }
        yield {name: value for name, value in given.items() if value is not None}
        return
    with SSHTestServer(**server_options) as server:
        parameters = server.executor_parameters()
        print(
            f"(no --host given: using the built-in test server on "
            f"{parameters['host']}:{parameters['port']})",
            file=sys.stderr,
        )
        yield parameters
