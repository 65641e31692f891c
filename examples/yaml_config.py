"""Executors from YAML: the !SSHExecutor, !DupingSSHExecutor and !ShellExecutor tags.

    python examples/yaml_config.py                       # a generated document for the test server
    python examples/yaml_config.py --config my.yaml      # your own document (one executor)

Needs PyYAML: ``pip install paramiko-executor[yaml]``. Loading never connects:
the first command does.
"""

import argparse
import json
import os

from paramiko_executor import yaml as executor_yaml
from paramiko_executor.testing import SSHTestServer

HERE = os.path.dirname(os.path.abspath(__file__))


def show(executor) -> None:
    result = executor.run_command("echo hello from $(hostname)")
    print(f"{executor!r}: {result.stdout.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a YAML file with one executor document")
    args = parser.parse_args()

    # The example configuration loads as it is (nothing connects, so the host may not exist).
    with open(os.path.join(HERE, "executor.yaml")) as stream:
        print(f"executor.yaml loads as {executor_yaml.load(stream)!r}")

    if args.config is not None:
        with open(args.config) as stream, executor_yaml.load(stream) as executor:
            show(executor)
        return 0

    # Several executors in one document, e.g. inside a larger application configuration.
    with SSHTestServer() as server:
        # JSON is YAML too: the test server's parameters become a flow mapping
        document = (
            f"remote: !SSHExecutor {json.dumps(server.executor_parameters())}\n"
            "local: !ShellExecutor\n"
        )
        print(f"generated document:\n{document}")
        executors = executor_yaml.load(document)
        for name, executor in executors.items():
            with executor:
                print(f"{name}: ", end="")
                show(executor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
