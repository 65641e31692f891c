"""One code path, local or remote: ShellExecutor and SSHExecutor are interchangeable.

    python examples/local_remote_switch.py              # locally, then on the built-in test server
    python examples/local_remote_switch.py --host login.example.org --user clown

Code written against ``Executor`` runs the same with ``ShellExecutor`` (a local
subprocess, handy in tests) and ``SSHExecutor`` (a remote host).
"""

import _target

from paramiko_executor import CommandExecutionFailure, Executor, ShellExecutor, SSHExecutor


def system_report(executor: Executor) -> str:
    """Collect a few facts about the machine behind ``executor``."""
    kernel = executor.run_command("uname -sr").stdout.strip()
    words = executor.run_command("wc -w", stdin_input="three short words\n").stdout.strip()
    try:
        executor.run_command("echo 'about to fail' >&2; exit 7")
    except CommandExecutionFailure as failure:
        failed = f"exit {failure.exit_code}, stderr {failure.stderr.strip()!r}"
    return f"kernel {kernel}; wc -w counted {words} words; failing command: {failed}"


def main() -> int:
    args = _target.parser(__doc__.splitlines()[0]).parse_args()
    with ShellExecutor() as local:
        print(f"local:  {system_report(local)}")
    with _target.target(args) as parameters, SSHExecutor(**parameters) as remote:
        print(f"remote: {system_report(remote)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
