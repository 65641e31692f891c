"""The contenders: one module each, loaded by name inside the contender's own process.

Each module defines ``Contender(params)``, where ``params`` are the keyword
arguments of ``OpenSSHServer.executor_parameters()`` (host, port, username,
client_keys, known_hosts, config).
"""

#: contender name -> module under this package, in table column order
MODULES = {
    "paramiko_executor": "library",
    "raw_paramiko": "raw_paramiko",
    "asyncio_executor": "tardis_executor",
    "asyncssh": "plain_asyncssh",
}

#: the contender all ratios are taken against
BASELINE = "asyncio_executor"
