"""The ``paramiko-executor`` command line.

Its commands: ``demo``, ``run``, ``probe``, ``put``, ``get`` and ``forward``.

Also reachable as ``python -m paramiko_executor``. :func:`main` returns the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, List, Optional, Sequence, TextIO, Tuple

from .executors import DupingSSHExecutor, Executor, SSHExecutor
from .results import CommandExecutionFailure, CommandResult, CommandTimeout, ExecutorFailure
from .stats import ExecutorStatistics
from .text import one_line, printable

__all__ = ["main", "EXIT_USAGE", "EXIT_TIMEOUT", "EXIT_EXECUTOR_FAILURE"]

PROG = "paramiko-executor"
#: bad command line or configuration (argparse's own convention)
EXIT_USAGE = 2
#: the command outran ``--timeout`` (as GNU ``timeout`` reports it)
EXIT_TIMEOUT = 124
#: the executor failed, or the remote command left no exit status (as ``ssh`` reports it)
EXIT_EXECUTOR_FAILURE = 255


class CommandLineError(Exception):
    """Bad options or configuration: reported in one line, exit status ``EXIT_USAGE``."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(_PrintableFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            handlers=[handler])
    try:
        return args.handler(args)  # type: ignore[no-any-return]
    except CommandLineError as err:
        print(f"{PROG}: error: {printable(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class _PrintableFormatter(logging.Formatter):
    """Escapes every record through `printable` before it reaches the terminal.

    Records quote servers (paramiko logs the server's version string before the host key
    is checked; exceptions quote disconnect reasons): an escape sequence in them must not
    drive the terminal, nor a newline forge a log line. The message is escaped whole (one
    line); a traceback keeps its lines, each escaped.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(printable(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(printable(line) for line in super().formatStack(stack_info).splitlines())


# --------------------------------------------------------------------------- parser

_RUN_EPILOG = f"""\
exit status:
  the remote command's own exit status, or
  {EXIT_TIMEOUT}  the command outran --timeout (the remote command is asked to stop)
  {EXIT_EXECUTOR_FAILURE}  the executor failed: host unreachable after all connect retries,
       authentication or host key refused, connection lost; or the remote command
       was killed by a signal (as ssh reports it). A one-line message goes to stderr.
  {EXIT_USAGE}    bad options or configuration file

A single COMMAND argument is sent as it is, so the remote shell interprets it;
several are quoted and joined with shlex.join. Put -- before the command.

examples:
  {PROG} run --host login.example.org --user clown --key ~/.ssh/id_ed25519 -- hostname
  {PROG} run --host myalias -- 'squeue -u $USER | wc -l'
  {PROG} run --config executor.yaml --timeout 30 -- sbatch job.sh
  tar c dir | {PROG} run --host node1 --stdin -- tar x -C /tmp
"""

_PROBE_EPILOG = f"""\
Prints one number: how many session channels the server lets one connection
open at once (OpenSSH's MaxSessions, default 10), as the executor probed it
when it connected. A configuration that sets max_sessions skips the probe and
prints that value instead. The probe opens bare channels only: no shell and no
command runs, so it is safe on keys restricted to one command.
Exit status 0, {EXIT_EXECUTOR_FAILURE} when the executor fails, {EXIT_USAGE} on bad options.

examples:
  {PROG} probe --host login.example.org --user clown
  {PROG} probe --config executor.yaml
"""

_TRANSFER_EPILOG = f"""\
Exit status 0 when the file was copied whole, {EXIT_EXECUTOR_FAILURE} when it was not (missing
or refused file, connection trouble, timeout: a one-line message goes to stderr),
{EXIT_USAGE} on bad options. The file never appears half-written under its final name.

examples:
  {PROG} put --host login.example.org job.sh /home/clown/job.sh --mode 750
  {PROG} get --config executor.yaml /scratch/clown/result.csv result.csv
"""

_DEMO_EPILOG = f"""\
Nothing but the installed package is needed: no sshd, no keys, no network
beyond 127.0.0.1. A terminal shows a progress bar; otherwise progress comes as
plain lines. The summary goes to stdout. Exit status 0 when every command
returned its own output, 1 otherwise.

examples:
  {PROG} demo
  {PROG} demo --commands 5000 --threads 200 --max-sessions 10
"""

_MAIN_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} run --host login.example.org --user clown -- uptime
  {PROG} run --config executor.yaml -- squeue -u clown
  {PROG} probe --host login.example.org

Run '{PROG} COMMAND --help' for the options of each command.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``paramiko-executor`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run shell commands on a remote host over one multiplexed SSH connection\n"
            "(paramiko_executor: thread-safe, MaxSessions-aware, with retries)."
        ),
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log connects, probes and retries to stderr (-vv: per-command detail too)",
    )
    commands = parser.add_subparsers(title="commands", dest="command_name", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run many commands from many threads against a built-in local SSH server",
        description=(
            "Start the built-in SSH test server on 127.0.0.1, run many commands ('echo N')\n"
            "from a thread pool through ONE SSHExecutor, check that every command got its\n"
            "own output, and print a summary: commands/s, the MaxSessions the executor\n"
            "probed, the peak number of concurrent channels and the TCP connections used."
        ),
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--commands", type=_positive_int, default=500, metavar="N",
        help="how many commands to run (default: %(default)s)",
    )
    demo.add_argument(
        "--threads", type=_positive_int, default=50, metavar="N",
        help="thread-pool workers sharing the one executor (default: %(default)s)",
    )
    demo.add_argument(
        "--max-sessions", type=_positive_int, default=10, metavar="N",
        help="the test server's MaxSessions, which the executor probes (default: %(default)s)",
    )
    demo.set_defaults(handler=_demo)

    connection = _connection_parser()
    run = commands.add_parser(
        "run",
        parents=[common, connection],
        help="run one command on a host and pass on its output and exit status",
        usage=f"{PROG} run (--config FILE.yaml | --host HOST [options]) [--timeout S] "
        "-- COMMAND [ARG ...]",
        description=(
            "Run one command through an SSHExecutor: its stdout and stderr go to this\n"
            "program's stdout and stderr, unchanged, and its exit status becomes ours.\n"
            "The command's stdin is empty (end-of-file at once) unless --stdin is given."
        ),
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS",
        help=f"stop waiting after SECONDS, ask the server to end the command, exit {EXIT_TIMEOUT}",
    )
    run.add_argument(
        "--stdin", action="store_true",
        help="send this program's standard input to the command (read to its end first)",
    )
    run.add_argument(
        "--env", action="append", type=_env_pair, default=[], metavar="NAME=VALUE",
        help="set a variable for the command (repeatable; the server must accept the name, "
        "OpenSSH: AcceptEnv)",
    )
    run.add_argument(
        "--pty", action="store_true",
        help="run the command on a pseudo-terminal (its stderr then arrives on stdout)",
    )
    run.add_argument(
        "--hosts", metavar="A,B,C",
        help="run on these hosts (names or ssh_config aliases) at once, with the connection "
        "options for all of them: each output line is prefixed 'HOST: ', failures are "
        f"summed up on stderr; exit 0 if every host succeeded, {EXIT_EXECUTOR_FAILURE} if an "
        "executor failed on any, else 1 if a command failed on any",
    )
    run.add_argument(
        "--hosts-file", metavar="FILE",
        help="like --hosts, one host per line ('#' starts a comment); may be combined with it",
    )
    run.add_argument("command", nargs="+", metavar="COMMAND", help="the command to run")
    run.set_defaults(handler=_run)

    probe = commands.add_parser(
        "probe",
        parents=[common, connection],
        help="print how many sessions the server allows on one connection (MaxSessions)",
        usage=f"{PROG} probe (--config FILE.yaml | --host HOST [options])",
        description="Connect and print the server's MaxSessions, as the executor probed it.",
        epilog=_PROBE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.set_defaults(handler=_probe)

    for name, first, second, what in (
        ("put", "LOCAL", "REMOTE", "copy a local file to the host (SFTP, atomic)"),
        ("get", "REMOTE", "LOCAL", "copy a file from the host (SFTP, atomic)"),
    ):
        transfer = commands.add_parser(
            name,
            parents=[common, connection],
            help=what,
            usage=f"{PROG} {name} (--config FILE.yaml | --host HOST [options]) {first} {second}",
            description=(
                f"{what[0].upper()}{what[1:]}: over SFTP on the executor's one connection,\n"
                "written under a temporary name and renamed when complete, retried from the\n"
                "start after a lost connection. A terminal shows a progress bar on stderr."
            ),
            epilog=_TRANSFER_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        transfer.add_argument("source", metavar=first)
        transfer.add_argument("destination", metavar=second)
        transfer.add_argument(
            "--timeout", type=_positive_float, metavar="SECONDS",
            help=f"give up after SECONDS (exit {EXIT_EXECUTOR_FAILURE})",
        )
        if name == "put":
            transfer.add_argument("--mode", type=_file_mode, metavar="OCTAL",
                                  help="permission bits of the remote file, e.g. 640")
        transfer.set_defaults(handler=_transfer)
    _add_forward_parser(commands, common, connection)
    return parser


def _connection_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    source = parser.add_argument_group(
        "executor configuration",
        "Either a YAML file with one executor document, or the options below.",
    )
    source.add_argument(
        "--config", metavar="FILE.yaml",
        help="YAML document with one executor, e.g. '!SSHExecutor {host: h, username: u}' "
        "(the !Tardis... spellings work too; needs PyYAML: pip install paramiko-executor[yaml])",
    )
    options = parser.add_argument_group(
        "connection options (instead of --config)",
        "Options not given come from the OpenSSH client configuration, then the defaults.",
    )
    options.add_argument(
        "--host", help="host name, address, or a Host alias from the ssh_config file"
    )
    options.add_argument(
        "--port", type=_positive_int, help="SSH port (default: ssh_config Port, else 22)"
    )
    options.add_argument("-l", "--user", metavar="USER", help="login name")
    options.add_argument(
        "-i", "--key", action="append", metavar="PATH",
        help="private key file; repeat for several (default: ssh_config IdentityFile, the "
        "SSH agent and ~/.ssh/id_*)",
    )
    options.add_argument(
        "--known-hosts", metavar="PATH|none",
        help="known_hosts file to verify the host key against (default: ~/.ssh/known_hosts; "
        "the system-wide GlobalKnownHostsFile and RevokedHostKeys are read too). "
        "'none' turns host key verification OFF: INSECURE, anyone in between can "
        "impersonate the host; for throw-away test hosts only",
    )
    options.add_argument(
        "--password-env", metavar="VAR",
        help="take the password from environment variable VAR (never from the command line, "
        "where other users can read it); VAR is removed from the environment once read, so "
        "no child process (a ProxyCommand) inherits it",
    )
    options.add_argument(
        "-F", "--ssh-config", action="append", metavar="PATH|none",
        help="OpenSSH client configuration file; repeat for several "
        "(default: ~/.ssh/config; 'none' reads none)",
    )
    options.add_argument(
        "--wrapper", metavar="PATH",
        help="use a DupingSSHExecutor: run PATH and feed it the command on stdin "
        "(for keys restricted to one command)",
    )
    options.add_argument(
        "--connect-retries", type=_non_negative_int, metavar="N",
        help="retries while the host is unreachable before giving up (default: 9)",
    )
    options.add_argument(
        "--connect-backoff", type=_non_negative_float, metavar="SECONDS",
        help="first wait between connect retries, doubled each time (default: 1)",
    )
    return parser


# the connection options that --config replaces, by their attribute name
_CONNECTION_DESTS = (
    "host", "port", "user", "key", "known_hosts", "password_env",
    "ssh_config", "wrapper", "connect_retries", "connect_backoff",
)


# --------------------------------------------------------------------------- executors


def _take_password(args: argparse.Namespace) -> Optional[str]:
    """The password ``--password-env`` names, taken out of the environment; None without it.

    Taken, not just read: a ProxyCommand (or any other child this process starts) would
    inherit it, and /proc/PID/environ shows it. So it can be taken once only: a command
    line that needs it for several executors takes it first and hands it to each.
    """
    if args.password_env is None:
        return None
    if args.password_env not in os.environ:
        raise CommandLineError(
            f"--password-env: environment variable {args.password_env} is not set"
        )
    return os.environ.pop(args.password_env)


def _executor(args: argparse.Namespace, password: Optional[str] = None) -> Executor:
    """The executor the options describe; ``CommandLineError`` if they do not fit.

    ``password``: the one `_take_password` took already, if the caller took it.
    """
    if args.config is not None:
        given = [f"--{dest.replace('_', '-')}" for dest in _CONNECTION_DESTS
                 if getattr(args, dest) is not None]
        if given:
            raise CommandLineError(f"--config cannot be combined with {', '.join(given)}")
        return _load_config(args.config)
    if args.host is None:
        raise CommandLineError("give --host HOST or --config FILE.yaml")
    parameters = {"host": args.host}
    if args.port is not None:
        parameters["port"] = args.port
    if args.user is not None:
        parameters["username"] = args.user
    if args.key is not None:
        parameters["client_keys"] = args.key
    if args.known_hosts is not None:
        parameters["known_hosts"] = None if args.known_hosts == "none" else args.known_hosts
    if args.password_env is not None:
        parameters["password"] = _take_password(args) if password is None else password
    if args.ssh_config is not None:
        parameters["config"] = () if args.ssh_config == ["none"] else tuple(args.ssh_config)
    if args.connect_retries is not None:
        parameters["connect_retries"] = args.connect_retries
    if args.connect_backoff is not None:
        parameters["connect_backoff"] = args.connect_backoff
    try:
        if args.wrapper is not None:
            return DupingSSHExecutor(wrapper=args.wrapper, **parameters)
        return SSHExecutor(**parameters)
    except (TypeError, ValueError) as err:
        raise CommandLineError(str(err)) from err


def _load_config(path: str) -> Executor:
    try:
        # optional dependency: only --config needs PyYAML
        from . import yaml as executor_yaml
    except ImportError as err:
        raise CommandLineError(str(err)) from err
    try:
        with open(path, encoding="utf-8") as stream:
            executor = executor_yaml.load(stream)
    except OSError as err:
        raise CommandLineError(f"--config: cannot read {path}: {err.strerror}") from err
    except (TypeError, ValueError) as err:
        raise CommandLineError(f"--config {path}: {err}") from err
    except executor_yaml.yaml.YAMLError as err:
        raise CommandLineError(f"--config {path}: {one_line(str(err))}") from err
    if not isinstance(executor, Executor):
        raise CommandLineError(
            f"--config {path}: the document must be one executor, e.g. '!SSHExecutor {{...}}', "
            f"not {type(executor).__name__}"
        )
    return executor


def _write(stream: TextIO, text: str) -> None:
    """Write command output as UTF-8 bytes, whatever this terminal's locale encoding is."""
    if text:
        stream.flush()
        stream.buffer.write(text.encode("utf-8"))
        stream.flush()


# --------------------------------------------------------------------------- run / probe


def _env_pair(text: str) -> Tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def _run(args: argparse.Namespace) -> int:
    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    if args.hosts is not None or args.hosts_file is not None:
        return _run_on_hosts(args, command)
    executor = _executor(args)
    stdin_input = sys.stdin.buffer.read() if args.stdin else None
    try:
        with executor:
            try:
                result = executor.run_command(command, stdin_input, timeout=args.timeout,
                                              env=dict(args.env) or None, pty=args.pty)
            finally:
                statistics = getattr(executor, "statistics", None)
                if args.verbose and statistics is not None:
                    print(f"{PROG}: executor statistics", file=sys.stderr)
                    _print_statistics(statistics(), sys.stderr)
    except CommandTimeout as failure:
        _write(sys.stdout, failure.stdout)
        _write(sys.stderr, failure.stderr)
        print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
        return EXIT_TIMEOUT
    except CommandExecutionFailure as failure:
        _write(sys.stdout, failure.stdout)
        _write(sys.stderr, failure.stderr)
        if failure.exit_code is None or not 0 < failure.exit_code < 256:
            # killed by a signal, or no exit status at all: no code of its own to pass on
            print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
            return EXIT_EXECUTOR_FAILURE
        return failure.exit_code
    except ExecutorFailure as failure:
        print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
        return EXIT_EXECUTOR_FAILURE
    _write(sys.stdout, result.stdout)
    _write(sys.stderr, result.stderr)
    return 0


def _host_names(args: argparse.Namespace) -> List[str]:
    """The hosts of ``--hosts`` then ``--hosts-file``, in order; `CommandLineError` if none."""
    names = [name.strip() for name in (args.hosts or "").split(",") if name.strip()]
    if args.hosts_file is not None:
        try:
            with open(args.hosts_file, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except OSError as err:
            raise CommandLineError(f"--hosts-file: cannot read {args.hosts_file}: "
                                   f"{err.strerror}") from err
        names.extend(line.split("#", 1)[0].strip() for line in lines)
        names = [name for name in names if name]
    if not names:
        raise CommandLineError("--hosts/--hosts-file name no host")
    return names


def _print_host_output(name: str, stdout: str, stderr: str) -> None:
    """A host's output, each line prefixed with ``name: `` (its last line ended)."""
    for stream, text in ((sys.stdout, stdout), (sys.stderr, stderr)):
        if text:
            lines = text.splitlines()
            _write(stream, "".join(f"{name}: {line}\n" for line in lines))


def _run_on_hosts(args: argparse.Namespace, command: str) -> int:
    """``run --hosts``: ``command`` on every host, output as each host finishes."""
    from .group import HostGroup  # only this subcommand needs it

    if args.config is not None or args.host is not None:
        raise CommandLineError("--hosts/--hosts-file cannot be combined with --config or --host")
    names = _host_names(args)
    stdin_input = sys.stdin.buffer.read() if args.stdin else None

    password = _take_password(args)  # once for every host: taking it removes it

    def executor_for(host: str) -> Executor:
        # The connection options of this command line, for one host.
        return _executor(argparse.Namespace(**dict(vars(args), host=host)), password)

    try:
        group = HostGroup(names, executor_class=executor_for)
    except (TypeError, ValueError) as err:
        raise CommandLineError(f"--hosts: {err}") from err
    interactive = sys.stderr.isatty()
    progress = Progress(len(names), sys.stderr, interactive=True) if interactive else None
    failed = {}
    with group:
        outcomes = group.run_command_as_completed(command, stdin_input, timeout=args.timeout)
        for done, (name, outcome) in enumerate(outcomes, 1):
            if progress is not None:
                sys.stderr.write("\r\x1b[K")  # clear the bar: output lines come first
            if isinstance(outcome, (CommandResult, CommandExecutionFailure)):
                _print_host_output(name, outcome.stdout, outcome.stderr)
            if not isinstance(outcome, CommandResult):
                failed[name] = outcome
            if progress is not None:
                progress.update(done, len(failed))
    if progress is not None:
        progress.finish()
    if not failed:
        return 0
    print(f"{PROG}: {len(failed)} of {len(names)} hosts failed:", file=sys.stderr)
    for name in names:  # in the order given, not the order they failed
        if name in failed:
            print(f"  {name}: {one_line(str(failed[name]))}", file=sys.stderr)
    if any(isinstance(failure, ExecutorFailure) for failure in failed.values()):
        return EXIT_EXECUTOR_FAILURE
    return 1


def _probe(args: argparse.Namespace) -> int:
    executor = _executor(args)
    if not isinstance(executor, SSHExecutor):
        raise CommandLineError(f"probe needs an SSH executor, not {type(executor).__name__}")
    try:
        with executor, executor.bounded_connection:
            limit = executor.session_limit
    except ExecutorFailure as failure:
        print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
        return EXIT_EXECUTOR_FAILURE
    print(limit)
    return 0


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected octal permission bits, not {text!r}") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"expected permission bits 0 to 7777, not {text}")
    return mode


def _transfer(args: argparse.Namespace) -> int:
    executor = _executor(args)
    if not hasattr(executor, "put"):
        raise CommandLineError(f"{args.command_name} needs an SSH executor, "
                               f"not {type(executor).__name__}")
    progress: Optional[Progress] = None

    def show(done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = Progress(total, sys.stderr, interactive=sys.stderr.isatty(), unit="bytes")
        progress.update(done)

    try:
        with executor:
            if args.command_name == "put":
                moved = executor.put(args.source, args.destination, mode=args.mode,
                                     timeout=args.timeout, progress=show)
            else:
                # It has put (checked above), and so get.
                moved = executor.get(args.source, args.destination, timeout=args.timeout,  # type: ignore[attr-defined]
                                     progress=show)
    except (ExecutorFailure, OSError, ValueError) as failure:
        # ValueError: a local path that names no regular file (a FIFO, /dev/null).
        if progress is not None:
            progress.finish()
        print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
        return EXIT_EXECUTOR_FAILURE
    if progress is not None:
        progress.finish()
    print(f"{PROG}: {args.command_name} {moved} bytes", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- demo


class Progress:
    """Shows how many of ``total`` commands (or bytes) are done on ``stream``.

    On a terminal a bar is redrawn in place (``\\r``), at most every
    ``interval`` seconds so that drawing never slows the run down; elsewhere
    (pipes, CI logs) a plain line is written at every tenth of the way.
    ``unit`` "bytes" counts data, shown in MiB; a ``total`` below 1 is unknown.
    """

    def __init__(
        self, total: int, stream: TextIO, interactive: bool, interval: float = 0.1,
        unit: str = "commands",
    ) -> None:
        self.total = total
        self.stream = stream
        self.interactive = interactive
        self.interval = interval
        self.unit = unit
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._last_tenth = 0

    def update(self, done: int, failed: int = 0) -> None:
        """Report ``done`` finished commands (or bytes), ``failed`` of them failed."""
        now = time.monotonic()
        if self.interactive:
            if now - self._last_draw >= self.interval or done == self.total:
                self._last_draw = now
                self.stream.write("\r" + self._bar(done, failed, now))
                self.stream.flush()
        elif self.total > 0:
            tenth = done * 10 // self.total
            if tenth > self._last_tenth:
                self._last_tenth = tenth
                failures = f", {failed} failed" if self.unit == "commands" else ""
                self.stream.write(
                    f"progress: {self._amount(done)}/{self._amount(self.total)} {self._label} "
                    f"({done * 100 // self.total}%){failures}\n"
                )
                self.stream.flush()

    @property
    def _label(self) -> str:
        return "MiB" if self.unit == "bytes" else self.unit

    def _amount(self, count: float) -> str:
        return f"{count / 2**20:.1f}" if self.unit == "bytes" else f"{count:.0f}"

    def finish(self) -> None:
        """End the bar's line so that what follows starts on a fresh line."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, done: int, failed: int, now: float, width: int = 30) -> str:
        elapsed = now - self._start
        rate = f"{self._amount(done / elapsed if elapsed > 0 else 0.0):>7} {self._label}/s"
        if self.total <= 0:
            return f"{self._amount(done)} {self._label}  {rate}"
        filled = width * done // self.total
        total = self._amount(self.total)
        bar = (f"[{'#' * filled}{'.' * (width - filled)}] {self._amount(done):>{len(total)}}/"
               f"{total} {done * 100 // self.total:3d}%  {rate}")
        return bar + (f"  {failed} failed" if self.unit == "commands" else "")


def _demo_command(executor: SSHExecutor, number: int) -> Optional[str]:
    """Run ``echo number``; None when it printed its own number, else what went wrong."""
    try:
        result = executor.run_command(f"echo {number}")
    except (CommandExecutionFailure, ExecutorFailure) as failure:
        return f"echo {number}: {type(failure).__name__}: {one_line(str(failure))}"
    if result.stdout != f"{number}\n":
        return f"echo {number}: got {result.stdout!r}"
    return None


def _demo(args: argparse.Namespace) -> int:
    # imported here: run and probe never need the test server
    from .testing import SSHTestServer

    progress = Progress(args.commands, sys.stderr, interactive=sys.stderr.isatty())
    failures: List[str] = []
    with SSHTestServer(max_sessions=args.max_sessions) as server:
        parameters = server.executor_parameters()
        print(
            f"Built-in SSH test server on {parameters['host']}:{parameters['port']} "
            f"(MaxSessions {args.max_sessions}); running {args.commands} commands "
            f"from {args.threads} threads through one SSHExecutor",
            file=sys.stderr,
        )
        with SSHExecutor(**parameters) as executor:
            start = time.monotonic()
            with ThreadPoolExecutor(max_workers=args.threads) as pool:
                futures = [pool.submit(_demo_command, executor, n) for n in range(args.commands)]
                for done, future in enumerate(as_completed(futures), 1):
                    failure = future.result()
                    if failure is not None:
                        failures.append(failure)
                    progress.update(done, len(failures))
            elapsed = time.monotonic() - start
            session_limit = executor.session_limit
            stats = executor.statistics()
        progress.finish()
        peak_channels = server.peak_channels
        connections = server.connections_accepted
    for failure in failures[:5]:
        print(f"failed: {failure}", file=sys.stderr)
    if len(failures) > 5:
        print(f"... and {len(failures) - 5} more failures", file=sys.stderr)
    rows = [
        ("commands", f"{args.commands}"),
        ("failures", f"{len(failures)}"),
        ("threads", f"{args.threads}"),
        ("elapsed", f"{elapsed:.2f} s"),
        ("commands/s", f"{args.commands / elapsed:.1f}"),
        ("MaxSessions (probed)", f"{session_limit}"),
        ("peak concurrent channels", f"{peak_channels}"),
        ("TCP connections", f"{connections}"),
    ]
    print("paramiko-executor demo summary")
    for label, value in rows:
        print(f"  {label:<26}{value}")
    print("executor statistics")
    _print_statistics(stats, sys.stdout)
    return 1 if failures else 0


def _print_statistics(stats: ExecutorStatistics, stream: TextIO) -> None:
    """Every field of ``stats``, one per line."""
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        shown = f"{value:.3f} s" if isinstance(value, float) else f"{value}"
        print(f"  {field.name:<26}{shown}", file=stream)


# --------------------------------------------------------------------------- forward

_FORWARD_EPILOG = f"""\
Each forwarded connection is a channel on the one SSH connection (no second
login). A lost connection is reconnected: -L keeps listening and new clients
go through the new connection; -R asks the server for its port again.
A forward the server refuses is a WARNING on stderr, and that
client's connection is closed; a refused -R port ends the command at once.

exit status: 0 after SIGTERM, 130 after Ctrl-C, {EXIT_EXECUTOR_FAILURE} if the executor failed, \
{EXIT_USAGE} bad options.

examples:
  {PROG} forward --host login.example.org -L 5432:db.internal:5432
  {PROG} forward --host login -L 127.0.0.1:8080:localhost:8888 -R 9000:localhost:3000
"""


def _add_forward_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        common: argparse.ArgumentParser,
                        connection: argparse.ArgumentParser) -> None:
    forward = commands.add_parser(
        "forward",
        parents=[common, connection],
        help="forward ports through the host until interrupted (like ssh -N -L/-R)",
        usage=f"{PROG} forward (--config FILE.yaml | --host HOST [options]) "
        "[-L [BIND:]PORT:HOST:HOSTPORT]... [-R [BIND:]PORT:HOST:HOSTPORT]...",
        description=(
            "-L: listen here on BIND:PORT (BIND default 127.0.0.1; PORT 0 picks one) and\n"
            "carry each connection to HOST:HOSTPORT as the server sees it.\n"
            "-R: ask the server to listen on BIND:PORT (BIND default localhost) and carry\n"
            "each connection to HOST:HOSTPORT as seen from here.\n"
            "Prints one line per forward (the addresses bound), then runs until interrupted."
        ),
        epilog=_FORWARD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    forward.add_argument("-L", dest="local", action="append", type=_forward_spec, default=[],
                         metavar="[BIND:]PORT:HOST:HOSTPORT", help="a local forward (repeatable)")
    forward.add_argument("-R", dest="remote", action="append", type=_forward_spec, default=[],
                         metavar="[BIND:]PORT:HOST:HOSTPORT", help="a remote forward (repeatable)")
    forward.set_defaults(handler=_forward)


ForwardSpec = Tuple[Optional[str], int, str, int]


def _forward_spec(text: str) -> ForwardSpec:
    """``[BIND:]PORT:HOST:HOSTPORT``; an IPv6 address goes in brackets."""
    import re

    host = r"(\[[^\]]+\]|[^:\[\]]+)"
    match = re.fullmatch(rf"(?:{host}:)?(\d+):{host}:(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected [BIND:]PORT:HOST:HOSTPORT, not {text!r}")
    bind, port, target, target_port = match.groups()
    if int(port) > 65535 or not 0 < int(target_port) <= 65535:
        raise argparse.ArgumentTypeError(f"a port out of range in {text!r}")
    return (None if bind is None else bind.strip("[]"), int(port), target.strip("[]"),
            int(target_port))


def _forward(args: argparse.Namespace) -> int:
    import signal
    import threading

    if not args.local and not args.remote:
        raise CommandLineError("give at least one -L or -R forward")
    executor = _executor(args)
    if not isinstance(executor, SSHExecutor):
        raise CommandLineError(f"forward needs an SSH executor, not {type(executor).__name__}")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        with executor:
            # Log in first, as ssh -N does: refused credentials or an unknown
            # host key fail the command, not each client that arrives later.
            executor._get_link()
            for bind, port, host, host_port in args.local:
                tunnel = executor.forward_local(host_port, host, local_port=port,
                                                local_host=bind or "127.0.0.1")
                where = tunnel.local_address
                print(f"-L {where[0]}:{where[1]} -> {host}:{host_port}", flush=True)
            for bind, port, host, host_port in args.remote:
                remote = executor.forward_remote(port, host_port, local_host=host,
                                                 remote_host=bind or "localhost")
                where = remote.remote_address
                print(f"-R {where[0]}:{where[1]} -> {host}:{host_port}", flush=True)
            while not stop.wait(1.0):  # a bounded wait, so that Ctrl-C gets through
                pass
    except ExecutorFailure as failure:
        print(f"{PROG}: {one_line(str(failure))}", file=sys.stderr)
        return EXIT_EXECUTOR_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
