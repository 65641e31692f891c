"""YAML configuration: executor tags for PyYAML.

Executor configurations written for the asyncio executor load unchanged::

    !SSHExecutor
    host: login.example.org
    username: clown
    client_keys: [/opt/ssh/key]
    on_disconnect_retry: true

A mapping node becomes the keyword arguments of the executor, so every key is
checked by the executor itself: an unknown key raises ``TypeError`` naming it.
``!ShellExecutor`` takes no parameters and may be written on its own.
The ``!Tardis...`` spellings construct the same classes.

Nothing connects while loading: the first command connects.

**Executor YAML is trusted configuration**, like ``~/.ssh/config``: load only files you
(or your administrator) control. Its parameters choose where to connect and how much to
trust: ``known_hosts: null`` turns host-key verification off, ``config:`` names any
ssh_config file, whose ``ProxyCommand`` or ``Match exec`` runs programs on this machine,
and ``wrapper:`` chooses what runs on the server. The safe loader only keeps YAML itself
from constructing arbitrary Python objects; it does not make an untrusted document safe.
An ssh_config file that cannot be read or parsed is a ``ValueError`` naming the file (and
where the tag is in the document), never quoting the file's lines.

PyYAML is an optional dependency: ``pip install paramiko-executor[yaml]``.
"""

from __future__ import annotations

import inspect
from typing import IO, Any, Callable, Dict, Type, TypeVar, Union

try:
    import yaml as yaml  # re-exported: the command line catches yaml.YAMLError through it
except ImportError as err:  # pragma: no cover - exercised only without PyYAML
    raise ImportError(
        "paramiko_executor.yaml needs PyYAML: pip install paramiko-executor[yaml]"
    ) from err

from .executors import DupingSSHExecutor, Executor, SSHExecutor
from .shell import ShellExecutor

__all__ = ["ExecutorLoader", "TAGS", "load", "register"]

#: YAML tag -> executor class; the ``!Tardis...`` names are the asyncio executor's plugin names
TAGS: Dict[str, Type[Executor]] = {
    "!SSHExecutor": SSHExecutor,
    "!DupingSSHExecutor": DupingSSHExecutor,
    "!ShellExecutor": ShellExecutor,
    "!TardisSSHExecutor": SSHExecutor,
    "!TardisDupingSSHExecutor": DupingSSHExecutor,
    "!TardisShellExecutor": ShellExecutor,
}

#: A loader class: every PyYAML loader is a constructor, which keeps the tags.
LoaderT = TypeVar("LoaderT", bound="yaml.constructor.BaseConstructor")


def _constructor(tag: str, cls: Type[Executor]) -> Callable[[yaml.BaseLoader, yaml.Node], Executor]:
    def construct(loader: yaml.BaseLoader, node: yaml.Node) -> Executor:
        if isinstance(node, yaml.MappingNode):
            # deep: nested values (mfa_config entries, key lists) must be complete
            # before the executor sees them, not filled in later by PyYAML
            parameters: Dict[Any, Any] = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.ScalarNode) and node.value == "":
            parameters = {}
        else:
            # Every node class has an id ("scalar", "sequence"); the stubs' base Node has not.
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{tag} takes a mapping of parameters, not a {node.id}",  # type: ignore[attr-defined]
                node.start_mark,
            )
        for key in parameters:
            if not isinstance(key, str):
                raise TypeError(f"{tag}: parameter names must be strings, not {key!r}")
        try:
            # binding names an unexpected key even for a class without parameters,
            # whose own error would not; the executor checks the rest
            inspect.signature(cls).bind(**parameters)
            return cls(**parameters)
        except TypeError as err:
            # the executor's message names the parameter; add where in the document it is
            raise TypeError(f"{err} ({tag}{_where(node.start_mark)})") from err
        except ValueError as err:
            raise ValueError(f"{err} ({tag}{_where(node.start_mark)})") from err

    return construct


def _where(mark: yaml.Mark | None) -> str:
    if mark is None:
        return ""
    return f" at {mark.name}, line {mark.line + 1}, column {mark.column + 1}"


def register(loader_class: Type[LoaderT]) -> Type[LoaderT]:
    """Add the executor tags to ``loader_class`` and return it.

    Pass a subclass of your own (``class MyLoader(yaml.SafeLoader): ...``), never PyYAML's
    ``yaml.SafeLoader`` itself: PyYAML keeps constructors per class, so the tags would reach
    every ``yaml.safe_load`` in the process, and any document loaded there could then
    configure executors (trusted configuration, see the module documentation).
    """
    for tag, cls in TAGS.items():
        loader_class.add_constructor(tag, _constructor(tag, cls))
    return loader_class


class ExecutorLoader(yaml.SafeLoader):
    """A ``yaml.SafeLoader`` that also knows the executor tags."""


register(ExecutorLoader)


def load(stream: Union[str, bytes, IO[str], IO[bytes]]) -> Any:
    """Load one YAML document with :class:`ExecutorLoader` (safe, plus the executor tags)."""
    return yaml.load(stream, Loader=ExecutorLoader)
