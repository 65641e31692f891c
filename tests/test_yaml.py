"""YAML configurations: the executor tags, load() and register()."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from paramiko_executor import DupingSSHExecutor, ShellExecutor, SSHExecutor
from paramiko_executor import yaml as executor_yaml
from paramiko_executor.testing import SSHTestServer

TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DP"


@pytest.fixture
def init_calls(monkeypatch):
    """Record the keyword arguments each executor class is constructed with."""
    calls = []

    def spy(cls):
        original = cls.__init__

        def init(self, **kwargs):
            calls.append((cls, kwargs))
            original(self, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)

    for cls in (SSHExecutor, DupingSSHExecutor, ShellExecutor):
        spy(cls)
    return calls


def test_ssh_executor_document_constructs_without_connecting(init_calls):
    executor = executor_yaml.load(
        "!SSHExecutor {host: login.example.org, username: clown, "
        "client_keys: [/opt/ssh/key], on_disconnect_retry: true}"
    )
    assert type(executor) is SSHExecutor
    assert init_calls == [
        (
            SSHExecutor,
            {
                "host": "login.example.org",
                "username": "clown",
                "client_keys": ["/opt/ssh/key"],
                "on_disconnect_retry": True,
            },
        )
    ]
    assert executor.session_limit is None  # nothing connected


def test_mfa_config_reaches_the_executor_complete_and_secret_stays_hidden(init_calls):
    document = textwrap.dedent(
        f"""\
        !SSHExecutor
        host: login.example.org
        username: clown
        client_keys: [/opt/ssh/key]
        on_disconnect_retry: true
        mfa_config:
          - prompt: "Enter 2FA Token:"
            totp: {TOTP_SECRET}
        """
    )
    executor = executor_yaml.load(document)
    (cls, kwargs), = init_calls
    # nested entries are constructed before the executor sees them, not filled in later
    assert kwargs["mfa_config"] == [{"prompt": "Enter 2FA Token:", "totp": TOTP_SECRET}]
    assert TOTP_SECRET not in repr(executor)
    assert TOTP_SECRET not in str(executor)


def test_duping_executor_document_with_wrapper(init_calls):
    executor = executor_yaml.load(
        "!DupingSSHExecutor {host: login.example.org, username: clown, "
        "client_keys: [/opt/ssh/key], wrapper: /home/clown/my_script.sh}"
    )
    assert type(executor) is DupingSSHExecutor
    assert init_calls[0] == (
        DupingSSHExecutor,
        {
            "host": "login.example.org",
            "username": "clown",
            "client_keys": ["/opt/ssh/key"],
            "wrapper": "/home/clown/my_script.sh",
        },
    )


@pytest.mark.parametrize(
    "tag, cls",
    [
        ("!SSHExecutor", SSHExecutor),
        ("!TardisSSHExecutor", SSHExecutor),
        ("!DupingSSHExecutor", DupingSSHExecutor),
        ("!TardisDupingSSHExecutor", DupingSSHExecutor),
    ],
)
def test_every_ssh_spelling_builds_its_class(tag, cls):
    assert type(executor_yaml.load(f"{tag} {{host: login.example.org}}")) is cls


@pytest.mark.parametrize(
    "document",
    ["!ShellExecutor", "!TardisShellExecutor", "!ShellExecutor {}", "executor: !ShellExecutor"],
)
def test_shell_executor_needs_no_parameters_and_runs(document):
    loaded = executor_yaml.load(document)
    executor = loaded["executor"] if isinstance(loaded, dict) else loaded
    assert type(executor) is ShellExecutor
    assert executor.run_command("echo local").stdout == "local\n"


def test_executors_nest_inside_larger_documents():
    loaded = executor_yaml.load(
        "sites:\n"
        "  - name: cluster\n"
        "    executor: !TardisSSHExecutor {host: login.example.org, username: clown}\n"
        "  - name: local\n"
        "    executor: !TardisShellExecutor\n"
    )
    assert [type(site["executor"]) for site in loaded["sites"]] == [SSHExecutor, ShellExecutor]


def test_unknown_key_is_a_type_error_naming_it_and_its_place():
    document = "# a comment\n!SSHExecutor {host: login.example.org, usernmae: clown}\n"
    with pytest.raises(TypeError, match="usernmae") as excinfo:
        executor_yaml.load(document)
    assert "!SSHExecutor" in str(excinfo.value)
    assert "line 2" in str(excinfo.value)


def test_unknown_key_of_the_shell_executor_is_a_type_error():
    with pytest.raises(TypeError, match="nonsense"):
        executor_yaml.load("!ShellExecutor {nonsense: 1}")


@pytest.mark.parametrize("document", ["!SSHExecutor login.example.org", "!SSHExecutor [a, b]"])
def test_parameters_must_be_a_mapping(document):
    with pytest.raises(yaml.constructor.ConstructorError, match="mapping"):
        executor_yaml.load(document)


def test_register_teaches_the_tags_to_that_loader_only():
    class MyLoader(yaml.SafeLoader):
        pass

    assert executor_yaml.register(MyLoader) is MyLoader
    assert type(yaml.load("!ShellExecutor", Loader=MyLoader)) is ShellExecutor
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load("!ShellExecutor")


def test_load_stays_safe():
    with pytest.raises(yaml.constructor.ConstructorError):
        executor_yaml.load("!!python/object/apply:os.system ['echo unsafe']")


def test_module_says_how_to_install_pyyaml_when_it_is_missing():
    # a fresh interpreter where `import yaml` fails, as without the [yaml] extra
    code = "import sys; sys.modules['yaml'] = None; import paramiko_executor.yaml"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "pip install paramiko-executor[yaml]" in proc.stderr


def _document(tag, parameters, **extra):
    """A YAML document for ``tag`` with ``parameters``: JSON is YAML flow style."""
    return f"{tag} {json.dumps({**parameters, **extra})}\n"


def test_document_for_the_test_server_runs_a_command():
    with SSHTestServer(max_sessions=4) as server:
        document = _document(
            "!TardisSSHExecutor", server.executor_parameters(), on_disconnect_retry=True
        )
        with executor_yaml.load(document) as executor:
            assert executor.run_command("echo from yaml").stdout == "from yaml\n"
            assert executor.session_limit == 4


def test_documents_run_against_real_sshd(sshd):
    parameters = sshd.executor_parameters()
    with executor_yaml.load(
        _document("!SSHExecutor", parameters, on_disconnect_retry=True)
    ) as executor:
        assert executor.run_command("echo real sshd").stdout == "real sshd\n"
    with executor_yaml.load(
        _document("!DupingSSHExecutor", parameters, wrapper="/bin/bash")
    ) as executor:
        result = executor.run_command("read line; echo got $line", stdin_input="data")
        assert result.stdout == "got data\n"
