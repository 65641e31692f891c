"""Command keys: DupingSSHExecutor with a key restricted to one wrapper script.

    python examples/command_key.py    # test server; a key forced to restricted_wrapper.sh
    python examples/command_key.py --host login.example.org --user clown \\
        --key ~/.ssh/id_command_key --wrapper /home/clown/bin/restricted_wrapper.sh

The server runs the key's forced command (``command="..."`` in
``authorized_keys``) whatever the client asks for. DupingSSHExecutor sends the
real command as the first line of the wrapper's stdin; the wrapper decides
whether to run it. See restricted_wrapper.sh: it allows squeue, sbatch and
scancel only.

SECURITY: a wrapper that runs whatever it reads (/bin/bash, the default, or
anything passing its input to a shell) turns the restricted key into a full
shell. Use an allowlist like restricted_wrapper.sh.
"""

import contextlib
import os
import shlex
import tempfile
from typing import Iterator

import _target

from paramiko_executor import CommandExecutionFailure, DupingSSHExecutor
from paramiko_executor.testing import SSHTestServer

WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "restricted_wrapper.sh")

JOB_SCRIPT = """\
#!/bin/bash
#SBATCH --time=00:05:00
srun hostname
"""

# Stand-ins for the Slurm commands, so that the example runs where Slurm is not installed.
STAND_INS = {
    "squeue": 'echo "squeue $*:"; echo "JOBID PARTITION NAME USER ST TIME NODES"; '
              'echo " 4241     short  sim clown  R 1:02     1"',
    "sbatch": 'lines=$(wc -l); echo "Submitted batch job 4242 (job script of $lines lines)"',
    "scancel": 'echo "cancelled job $1" >&2',
}


@contextlib.contextmanager
def slurm_stand_ins() -> Iterator[str]:
    """A directory with fake ``squeue``, ``sbatch`` and ``scancel`` scripts."""
    with tempfile.TemporaryDirectory() as directory:
        for name, body in STAND_INS.items():
            path = os.path.join(directory, name)
            with open(path, "w") as script:
                script.write(f"#!/bin/sh\n{body}\n")
            os.chmod(path, 0o755)
        yield directory


def run(executor: DupingSSHExecutor, command: str, stdin_input: str = "") -> None:
    try:
        result = executor.run_command(command, stdin_input=stdin_input)
        output = " ".join(text.strip() for text in (result.stdout, result.stderr) if text)
        print(f"{command!r}: ok: {output}")
    except CommandExecutionFailure as failure:
        print(f"{command!r}: refused (exit {failure.exit_code}): {failure.stderr.strip()}")


def main() -> int:
    parser = _target.parser(__doc__.splitlines()[0])
    parser.add_argument("--wrapper", default=WRAPPER, help="the wrapper's path on the server")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.host is None:
            stand_ins = stack.enter_context(slurm_stand_ins())
            # the test server makes a second key whose logins can only run this command
            forced = f"PATH={shlex.quote(stand_ins)}:\"$PATH\" exec {shlex.quote(WRAPPER)}"
            server = stack.enter_context(SSHTestServer(forced_command=forced))
            parameters = server.executor_parameters(client_keys=[server.forced_key_path])
        else:
            parameters = stack.enter_context(_target.target(args))
        executor = stack.enter_context(DupingSSHExecutor(wrapper=args.wrapper, **parameters))

        run(executor, "squeue --me")
        if args.host is None:  # never submit or cancel real jobs from an example
            run(executor, "sbatch", stdin_input=JOB_SCRIPT)
            run(executor, "scancel 4242")
        # what the key must not do: harmless commands, in case a wrapper lets them through
        run(executor, "id")
        run(executor, "squeue; id")
        run(executor, "squeue $(id)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
