"""Mistakes a user can make with the API, each of which ``mypy --strict`` must report.

Never run. Each line ending in ``# E: code`` must get exactly that error
from ``tests/test_typing.py``, and no other line any: if a public type
decayed to ``Any``, ``user_program.py`` would still pass, but these would not.
"""

from __future__ import annotations

from paramiko_executor import CommandExecutionFailure, HostGroup, SSHExecutor


def show_text(stream: str, line: str) -> None:
    print(stream, line)


def mistakes(executor: SSHExecutor, group: HostGroup) -> None:
    text: bytes = executor.run_command("hostname").stdout  # E: assignment
    data: str = executor.run_command("cat /bin/true", encoding=None).stdout  # E: assignment
    executor.run_command("cat /bin/true", encoding=None, on_output=show_text)  # E: arg-type
    sent: str = executor.put("a", "/tmp/a")  # E: assignment
    with SSHExecutor(host="h") as entered:
        entered.no_such_method()  # E: attr-defined
    for outcome in group.run_command("uptime").succeeded.values():
        outcome.stdout.decode()  # E: attr-defined
    try:
        executor.run_command("false")
    except CommandExecutionFailure as failure:
        print(failure.exit_code + 1)  # E: operator
    reply: str = executor.open_connection("db", 5432).recv(4)  # E: assignment
    line: bytes = executor.open_connection("db", 5432).makefile("r").readline()  # E: assignment
    executor.forward_local("5432")  # E: arg-type
    for _name, done in group.run_command_as_completed("uptime"):
        print(done.stdout)  # E: union-attr
    print(text, data, sent, reply, line)
