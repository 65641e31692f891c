"""Fan out: many threads, one SSHExecutor, one SSH connection.

    python examples/thread_pool.py                      # against the built-in test server
    python examples/thread_pool.py --host login.example.org --user clown

A thread pool of 32 workers runs 200 commands through one executor. The
executor keeps at most MaxSessions channels open at once; the other workers
wait for a free slot instead of failing.
"""

from concurrent.futures import ThreadPoolExecutor, as_completed

import _target

from paramiko_executor import CommandExecutionFailure, ExecutorFailure, SSHExecutor


def checksum(executor: SSHExecutor, number: int) -> str:
    """A small piece of remote work: the CRC of a number, computed by the remote ``cksum``."""
    result = executor.run_command("cksum", stdin_input=f"{number}\n")
    return result.stdout.split()[0]


def main() -> int:
    args = _target.parser(__doc__.splitlines()[0]).parse_args()
    with _target.target(args) as parameters, SSHExecutor(**parameters) as executor:
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = {pool.submit(checksum, executor, number): number for number in range(200)}
            sums = {}
            for future in as_completed(futures):
                try:
                    sums[futures[future]] = future.result()
                except (CommandExecutionFailure, ExecutorFailure) as failure:
                    print(f"number {futures[future]} failed: {failure}")
        print(f"{len(sums)} of {len(futures)} commands succeeded over one connection")
        print(f"at most {executor.session_limit} ran at once (the server's MaxSessions)")
        print(f"cksum of 0..4: {[sums[n] for n in range(5) if n in sums]}")
    return 0 if len(sums) == len(futures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
