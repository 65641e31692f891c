"""Authentication on a ``paramiko.Transport``: keys or password, then keyboard-interactive MFA.

``SSHClient.connect`` cannot answer keyboard-interactive prompts from code, so the executor
authenticates on the transport itself with :func:`authenticate`. The first factor follows
``SSHClient._auth``'s rules (explicit ``pkey``, ``key_filenames``, the agent, ``~/.ssh/id_*``, then
the password); when the server answers with partial success, or offers keyboard-interactive
only, ``Transport.auth_interactive`` answers its prompts from ``mfa_config`` (TOTP codes via pyotp)
and the password.

Secrets (password, passphrase, TOTP secret) never appear in a ``repr()``, an exception text or a
log record written here.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from paramiko.ssh_exception import (
    AuthenticationException,
    BadAuthenticationType,
    PartialAuthentication,
    ProxyCommandFailure,
    SSHException,
)

from .errors import AuthenticationFailure, AuthenticationInterrupted, ExecutorFailure
from .hostkeys import fingerprint
from .internals import UserAuth, wrap_disconnect
from .text import printable

# The ledger lives in .totp; imported here so that auth.TOTP_LEDGER and auth.TOTPLedger keep
# working (tests replace auth.TOTP_LEDGER, which _Login reads at each login).
from .totp import TOTP_LEDGER, TOTPLedger
from .totp import checked_secret as _checked_secret

__all__ = [
    "MFAEntry",
    "Credentials",
    "parse_mfa_config",
    "authenticate",
    "AuthenticationInterrupted",
    "TOTPLedger",
    "TOTP_LEDGER",
]

log = logging.getLogger("paramiko_executor.auth")

_HIDDEN = "<hidden>"
# Methods in the order a first factor is tried, like SSHClient._auth: keys, password, then
# keyboard-interactive (which also answers a password prompt when the password method is off).
_METHOD_ORDER = ("publickey", "password", "keyboard-interactive")
# A server may chain factors ("publickey,keyboard-interactive,keyboard-interactive"); a server
# that keeps answering "partial success" forever must not keep us looping.
_MAX_ROUNDS = 8
# RFC 4253 disconnect reason SSH_DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE.
_NO_MORE_AUTH_METHODS = 14
# RFC 4253 disconnect reasons that say the server will never accept this client as it is:
# another attempt would only be disconnected the same way.
_PROTOCOL_REASONS = {
    2: "protocol error",
    3: "key exchange failed",
    5: "MAC error",
    6: "compression error",
    7: "service not available",
    8: "protocol version not supported",
    15: "illegal user name",
}
# Prompts that contain "password" but must never be answered with the current password
# (an expired password being changed through PAM).
_PASSWORD_CHANGE_WORDS = ("new", "retype", "again", "confirm", "repeat")
_KEY_TYPE_MISMATCH = re.compile(r"encountered \S+ key, expected|not a valid \S+ private key")


class _KeyCache:
    """Private keys loaded from files, shared by the logins of this process.

    Each connect of each host would otherwise read and parse its key files
    again (every key class tried in turn): a HostGroup's hosts mostly share
    them. An entry is used only while the key file (and its ``-cert.pub``, or
    its absence) holds the bytes it was loaded from, and only with the
    passphrase it was loaded with, so a changed file or another passphrase
    loads (or fails) as before. The bytes are read again each time, a read
    that costs little beside a parse: a stat stamp (mtime, ctime) misses
    rewrites within the file system's time granularity (whole seconds on
    some) and writes through a shared map. Files and passphrase are kept
    only as an HMAC under a key of this process, never as text. Only keys
    that loaded are kept: an unusable file is tried (and reported) on every
    login. ``_lock`` guards ``_keys``.
    """

    #: Entries kept at most; a full cache starts over.
    LIMIT = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._salt = os.urandom(32)
        self._keys: Dict[Tuple[Any, ...], paramiko.PKey] = {}

    def key(self, key_path: str, cert_path: str,
            passphrase: Optional[str]) -> Optional[Tuple[Any, ...]]:
        """What identifies the key loaded now; None when a file cannot be read."""
        key_text = _regular_file_bytes(key_path)
        if key_text is None:
            return None  # the loader reports why
        cert_text = None
        if os.path.isfile(cert_path):  # the loader's test for a certificate
            cert_text = _regular_file_bytes(cert_path)
            if cert_text is None:
                return None
        # surrogatepass: one encoding per string ("replace" gave "a\udc80" the key of "a?").
        secret = None if passphrase is None else passphrase.encode("utf-8", "surrogatepass")
        mac = hmac.new(self._salt, digestmod=hashlib.sha256)
        for part in (key_text, cert_text, secret):
            mac.update(b"\0" if part is None else b"\1" + len(part).to_bytes(8, "big") + part)
        return (key_path, mac.digest())

    def get(self, key: Tuple[Any, ...]) -> Optional[paramiko.PKey]:
        with self._lock:
            return self._keys.get(key)

    def put(self, key: Tuple[Any, ...], pkey: paramiko.PKey) -> None:
        with self._lock:
            if len(self._keys) >= self.LIMIT:
                self._keys.clear()
            self._keys[key] = pkey

    def reset_after_fork(self) -> None:
        # A parent's thread may have held the lock at the fork; the keys stay valid.
        self._lock = threading.Lock()


def _regular_file_bytes(path: str) -> Optional[bytes]:
    """The bytes of a regular file; None for any other (a pipe is the loader's to read once)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


_KEYS = _KeyCache()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_KEYS.reset_after_fork)


@dataclass(frozen=True, repr=False)
class MFAEntry:
    """One ``mfa_config`` entry: a keyboard-interactive prompt and the base32 TOTP secret for it.

    ``totp`` is kept normalised (upper case, no whitespace). ``repr()`` hides it.
    """

    prompt: str
    totp: str

    def __repr__(self) -> str:
        return f"MFAEntry(prompt={self.prompt!r}, totp={_HIDDEN})"


@dataclass(frozen=True, repr=False)
class Credentials:
    """Everything :func:`authenticate` may use to log in; ``repr()`` hides every secret.

    ``password`` doubles as the key passphrase when ``passphrase`` is None (paramiko's rule),
    and answers keyboard-interactive password prompts. ``auth_strategy`` is a paramiko
    ``AuthStrategy`` (paramiko >= 3.2); when given it replaces the first factor.
    """

    username: str
    password: Optional[str] = None
    pkey: Optional[paramiko.PKey] = None
    key_filenames: Tuple[str, ...] = ()
    passphrase: Optional[str] = None
    allow_agent: bool = True
    look_for_keys: bool = True
    mfa: Tuple[MFAEntry, ...] = ()
    auth_strategy: Optional[Any] = None

    def __repr__(self) -> str:
        def hidden(value: Optional[str]) -> Optional[str]:
            return None if value is None else _HIDDEN

        return (
            f"Credentials(username={self.username!r}, password={hidden(self.password)}, "
            f"pkey={self.pkey!r}, key_filenames={self.key_filenames!r}, "
            f"passphrase={hidden(self.passphrase)}, allow_agent={self.allow_agent!r}, "
            f"look_for_keys={self.look_for_keys!r}, mfa={self.mfa!r}, "
            f"auth_strategy={self.auth_strategy!r})"
        )


def parse_mfa_config(
    value: Optional[Sequence[Union[Mapping[str, str], MFAEntry]]],
) -> Tuple[MFAEntry, ...]:
    """Validate ``mfa_config`` and return it as a tuple of :class:`MFAEntry`.

    ``value`` is None (no MFA: ``()``) or a list of dicts with exactly the keys ``"prompt"`` and
    ``"totp"``, both strings; already parsed :class:`MFAEntry` items pass through. Raises
    ``TypeError`` for wrong types and ``ValueError`` for an empty or duplicate prompt or a secret
    that is not valid base32, naming ``mfa_config`` and the entry, never echoing a secret.
    """
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(
            "mfa_config must be a list of {'prompt': ..., 'totp': ...} dicts or None, "
            f"not {type(value).__name__}"
        )
    entries: List[MFAEntry] = []
    for index, item in enumerate(value):
        where = f"mfa_config[{index}]"
        if isinstance(item, MFAEntry):
            prompt, secret = item.prompt, item.totp
        elif isinstance(item, Mapping):
            keys = set(item)
            if keys != {"prompt", "totp"}:
                names = sorted(str(k) for k in keys ^ {"prompt", "totp"})
                raise ValueError(
                    f"{where} must have exactly the keys 'prompt' and 'totp' "
                    f"(missing or unknown: {', '.join(names)})"
                )
            prompt, secret = item["prompt"], item["totp"]
        else:
            raise TypeError(f"{where} must be a dict, not {type(item).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"{where}['prompt'] must be a str, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{where}['prompt'] must not be empty")
        if any(e.prompt.strip() == prompt.strip() for e in entries):
            raise ValueError(f"{where}['prompt'] repeats an earlier prompt: {prompt.strip()!r}")
        secret = _checked_secret(f"{where}['totp']", secret)
        entries.append(MFAEntry(prompt=prompt, totp=secret))
    return tuple(entries)



class _PromptRefused(EOFError):
    """Raised inside paramiko's transport thread so that an unknown prompt is never answered.

    paramiko then closes the transport. An ``EOFError`` because paramiko ends its thread on
    one quietly (a DEBUG record), where any other exception is logged at ERROR with a
    traceback (printed to stderr in programs without logging set up); the refusal itself
    reaches the caller as ``AuthenticationFailure``.
    """


def _is_password_prompt(text: str) -> bool:
    lowered = text.lower()
    return "password" in lowered and not any(w in lowered for w in _PASSWORD_CHANGE_WORDS)


class _PromptAnswerer:
    """The ``auth_interactive`` handler: answers from ``mfa_config`` and the password only.

    Runs in paramiko's transport thread. A prompt it cannot answer is recorded in ``refusal``
    and nothing is sent (the transport is closed instead): a wrong answer could count as a
    failed login and lock the account.
    """

    def __init__(self, creds: Credentials, ledger: TOTPLedger) -> None:
        self._password = creds.password
        self._ledger = ledger
        self._secrets = {entry.prompt.strip(): entry.totp for entry in creds.mfa}
        self.refusal: Optional[str] = None
        self.answered: List[str] = []

    def __call__(
        self, title: str, instructions: str, prompt_list: Sequence[Tuple[str, bool]]
    ) -> List[str]:
        prompts = [prompt.strip() for prompt, _echo in prompt_list]
        log.debug("keyboard-interactive prompts from server: %r", prompts)
        # Decide every answer before producing any code: a refused prompt later in the list
        # must not leave a TOTP code recorded as sent.
        plan: List[Tuple[str, Optional[str]]] = []
        for prompt in prompts:
            if prompt in self._secrets:
                plan.append((prompt, self._secrets[prompt]))
            elif _is_password_prompt(prompt) and self._password is not None:
                plan.append((prompt, None))
            else:
                if _is_password_prompt(prompt):
                    why = "the server asks for a password and none was given"
                else:
                    configured = ", ".join(repr(p) for p in self._secrets) or "none"
                    why = f"no mfa_config entry matches it (configured prompts: {configured})"
                # The prompt is the server's text: escaped, it cannot drive a terminal.
                self.refusal = (
                    f"keyboard-interactive prompt '{printable(prompt)}' not answered: {why}"
                )
                raise _PromptRefused(self.refusal)
        answers: List[str] = []
        for prompt, secret in plan:
            if secret is None:
                answers.append(self._password or "")
            else:
                answers.append(self._ledger.issue(secret))
            self.answered.append(prompt)
        return answers


_Outcome = Optional[List[str]]  # None: refused; []: authenticated; [...]: partial, methods left


class _Login:
    """One run of :func:`authenticate`: the attempts made and what the server said."""

    def __init__(self, transport: paramiko.Transport, creds: Credentials, host: Optional[str],
                 abandoned: Optional[Callable[[], bool]] = None):
        self.t = transport
        self.abandoned = abandoned
        self.userauth = UserAuth(transport)
        self.creds = creds
        self.target = host if host is not None else _peer(transport)
        self.ledger = TOTP_LEDGER
        self.answerer = _PromptAnswerer(creds, self.ledger)
        self.tried: List[str] = []
        self.allowed: Optional[List[str]] = None
        self.succeeded: List[str] = []
        self.disconnect: Optional[Tuple[int, str]] = None
        #: Requests sent so far: before the first, the server's methods are unknown.
        self.requests = 0
        self.agent: Optional[paramiko.Agent] = None

    def gone(self) -> bool:
        """Whether the login was abandoned; `AuthenticationInterrupted` once its transport ended.

        Not a `LoginAbandoned`: a connection the server broke (or close() ended) is
        no login the executor gave up, and counts as a failed connect unless closed.
        """
        if not self.t.is_active():
            raise AuthenticationInterrupted(
                f"connection to {self.target} lost during authentication "
                "(waiting for a fresh TOTP code)")
        return self.abandoned is not None and self.abandoned()

    # -- outcome classification -------------------------------------------------------------

    def fail(self, reason: str) -> AuthenticationFailure:
        # The method names are the server's text, like its prompts.
        allowed = (", ".join(printable(method) for method in self.allowed)
                   if self.allowed is not None else "unknown")
        tried = "; ".join(self.tried) or "nothing"
        return AuthenticationFailure(
            f"Authentication as {self.creds.username!r} on {self.target} failed: {reason} "
            f"(tried: {tried}; server allows: {allowed})"
        )

    def _raise_if_not_refusal(self, what: str, error: BaseException, started: float) -> None:
        """Raise what an exception during one attempt really means, unless it is a refusal."""
        if self.answerer.refusal is not None:
            raise self.fail(self.answerer.refusal) from None
        if self.disconnect is not None:
            code, text = self.disconnect
            if code == _NO_MORE_AUTH_METHODS or "auth" in text.lower():
                self.tried.append(f"{what} (server disconnected)")
                raise self.fail(f"the server closed the connection: {printable(text)}") from None
            if code in _PROTOCOL_REASONS:
                raise ExecutorFailure(
                    f"{self.target} ended the connection during authentication as "
                    f"{self.creds.username!r} ({what}) for a protocol reason: "
                    f"{_PROTOCOL_REASONS[code]} ({printable(text)})") from None
        if not self.t.is_active():
            said = f" (server said: {printable(self.disconnect[1])})" if self.disconnect else ""
            raise AuthenticationInterrupted(
                f"connection to {self.target} lost during authentication ({what}){said}"
            ) from error
        timeout = self.t.auth_timeout
        if (
            isinstance(error, AuthenticationException)
            and timeout is not None
            and time.monotonic() - started >= timeout
        ):
            raise AuthenticationInterrupted(
                f"{self.target} did not answer {what} within auth_timeout ({timeout} s)"
            ) from error

    def attempt(self, what: str, call: Callable[[], Any]) -> _Outcome:
        """Run one ``auth_*`` call and classify its result."""
        log.debug("trying %s for %r on %s", what, self.creds.username, self.target)
        self.requests += 1
        started = time.monotonic()
        try:
            result = call()
        except PartialAuthentication as e:
            self.tried.append(f"{what} (partial success)")
            return list(e.allowed_types)
        except BadAuthenticationType as e:
            self._raise_if_not_refusal(what, e, started)
            self.allowed = list(e.allowed_types)
            self.tried.append(f"{what} (method not allowed)")
            return None
        except AuthenticationException as e:
            self._raise_if_not_refusal(what, e, started)
            if self.userauth.methods is not None:
                self.allowed = self.userauth.methods
            detail = printable(str(e).strip()) if self.creds.auth_strategy is not None else ""
            self.tried.append(f"{what} (refused{': ' + detail if detail else ''})")
            return None
        except (SSHException, EOFError, OSError) as e:
            self._raise_if_not_refusal(what, e, started)
            if isinstance(e, (EOFError, OSError, ProxyCommandFailure)):
                # The request could not be sent: the connection broke before
                # paramiko's thread noticed, which is no refusal of the method.
                raise AuthenticationInterrupted(
                    f"connection to {self.target} lost during authentication ({what})"
                ) from e
            self.tried.append(f"{what} ({type(e).__name__}: {printable(e)})")
            return None
        if self.t.is_authenticated():
            return []
        # auth_* returns the methods left after a partial success; AuthStrategy returns the
        # results of its sources, the last of which holds that list.
        if isinstance(result, list) and result and hasattr(result[-1], "result"):
            result = result[-1].result
        if isinstance(result, (list, tuple)) and result:
            self.tried.append(f"{what} (partial success)")
            return [str(m) for m in result]
        self.tried.append(f"{what} (no answer)")
        return None

    # -- the first factor, paramiko's way ---------------------------------------------------

    def _load_key(self, path: str) -> Optional[paramiko.PKey]:
        """Load a private key file as SSHClient._key_from_filepath does (with its -cert.pub).

        A key this process loaded before from the same, unchanged files with
        the same passphrase is taken from `_KEYS` instead.
        """
        cert_suffix = "-cert.pub"
        key_path = path[: -len(cert_suffix)] if path.endswith(cert_suffix) else path
        cert_path = key_path + cert_suffix
        passphrase = self.creds.passphrase
        if passphrase is None:
            passphrase = self.creds.password
        # An empty one is none, as ssh's empty answer to its prompt (bcrypt refuses it).
        passphrase = passphrase or None
        cache_key = _KEYS.key(key_path, cert_path, passphrase)
        if cache_key is not None:
            cached = _KEYS.get(cache_key)
            if cached is not None:
                return cached
        problems: List[BaseException] = []
        key_classes: Tuple[Type[paramiko.PKey], ...] = (
            paramiko.RSAKey, paramiko.ECDSAKey, paramiko.Ed25519Key)
        decrypted = None
        try:
            decrypted = _decrypt_legacy_pem(key_path, passphrase)
        except SSHException as e:
            problems.append(e)
            key_classes = ()
        for key_class in key_classes:
            try:
                if decrypted is not None:
                    key = key_class.from_private_key(io.StringIO(decrypted))
                else:
                    key = key_class.from_private_key_file(key_path, passphrase)
            except SSHException as e:
                problems.append(e)
                continue
            except OSError as e:
                problems.append(e)
                break
            if os.path.isfile(cert_path):
                key.load_certificate(cert_path)
            if cache_key is not None:
                _KEYS.put(cache_key, key)
            return key
        text = _key_problem(problems)
        log.warning("cannot use key file %s: %s", key_path, text)
        self.tried.append(f"publickey {key_path} (unusable: {text})")
        return None

    def _discovered_key_files(self) -> Iterator[str]:
        for name in ("rsa", "ecdsa", "ed25519"):
            for directory in (".ssh", "ssh"):  # ~/ssh/ is for Windows, as in paramiko
                path = os.path.expanduser(f"~/{directory}/id_{name}")
                if os.path.isfile(path):
                    yield path

    def _keys(self) -> Iterator[Tuple[str, paramiko.PKey]]:
        creds = self.creds
        if creds.pkey is not None:
            yield "given pkey", creds.pkey
        for path in creds.key_filenames:
            key = self._load_key(os.path.expanduser(path))
            if key is not None:
                yield path, key
        if creds.allow_agent:
            try:
                self.agent = paramiko.Agent()
                agent_keys = self.agent.get_keys()
            except (SSHException, OSError) as e:
                log.debug("SSH agent unusable: %s", e)
                agent_keys = ()
            for key in agent_keys:
                yield "agent key", key
        if creds.look_for_keys:
            for path in self._discovered_key_files():
                key = self._load_key(path)
                if key is not None:
                    yield path, key

    def publickey(self) -> _Outcome:
        for source, key in self._keys():
            what = f"publickey {source} {key.get_name()} {fingerprint(key)}"
            outcome = self.attempt(
                what, lambda key=key: self.userauth.request("publickey", self.creds.username, key)  # type: ignore[misc]
            )
            if outcome is not None:
                return outcome
            if self.allowed is not None and "publickey" not in self.allowed:
                return None
        return None

    def auth_deadline(self) -> Optional[float]:
        """When ``auth_timeout`` from now ends (a `time.monotonic` value), None without one."""
        timeout = self.t.auth_timeout
        return None if timeout is None else time.monotonic() + timeout

    # -- rounds -------------------------------------------------------------------------------

    def one_round(self, allowed: List[str]) -> List[str]:
        """Try the allowed methods in order; return [] when done or the methods still required."""
        self.allowed = allowed
        user = self.creds.username
        for method in _METHOD_ORDER:
            if method not in self.allowed:
                continue
            if method == "publickey":
                outcome = self.publickey()
            elif method == "password":
                password = self.creds.password
                if password is None:
                    continue
                outcome = self.attempt(
                    "password",
                    lambda password=password: self.userauth.request("password", user, password),  # type: ignore[misc]
                )
            else:
                if self.requests == 0 and self.creds.password is None and not self.creds.mfa:
                    # Nothing heard yet and nothing to answer prompts with: "none" tells
                    # whether keyboard-interactive is allowed at all.
                    outcome = self.ask_methods()
                    if outcome is not None:
                        return outcome
                    if method not in self.allowed:
                        continue
                for entry in self.creds.mfa:
                    # Wait here, not inside the handler: the handler runs under auth_timeout.
                    # The wait ends with that timeout, once close() ends the transport,
                    # or once nobody wants the login (no code was sent yet).
                    self.ledger.wait_until_fresh(entry.totp, deadline=self.auth_deadline(),
                                                 abandoned=self.gone)
                outcome = self.attempt(
                    "keyboard-interactive",
                    lambda: self.userauth.request("interactive", user, self.answerer),
                )
            if outcome is not None:
                self.succeeded.append(method)
                return outcome
        raise self.fail("no method was accepted")

    def ask_methods(self) -> _Outcome:
        """Send "none", which tells the methods the server allows.

        Not counted as an attempt (OpenSSH does not count it either); a server
        that wants no authentication lets us in on it.
        """
        outcome = self.attempt("none", lambda: self.userauth.request("none", self.creds.username))
        if outcome is not None:
            self.succeeded.append("none")
            return outcome
        self.tried.pop()
        return None

    def first_request(self) -> List[str]:
        """The auth_strategy's outcome, else every method: [] when done or the methods to try.

        Like ``SSHClient.connect``, the first factor goes out at once, without
        a "none" request first: a refusal names the methods that can continue.
        """
        t = self.t
        strategy = self.creds.auth_strategy
        if strategy is None:
            return list(_METHOD_ORDER)
        outcome = self.attempt("auth_strategy", lambda: strategy.authenticate(transport=t))
        if outcome is None:
            raise self.fail("the auth_strategy was refused")
        self.succeeded.append("auth_strategy")
        return outcome

    def run(self) -> None:
        remaining = self.first_request()
        rounds = 0
        while not self.t.is_authenticated():
            if rounds == _MAX_ROUNDS:
                raise self.fail(f"the server still asked for more after {rounds} partial successes")
            remaining = self.one_round(remaining)
            rounds += 1
        log.info(
            "authenticated as %r on %s (%s)",
            self.creds.username,
            self.target,
            ", ".join(self.succeeded),
        )


def _decrypt_legacy_pem(path: str, passphrase: Optional[str]) -> Optional[str]:
    """The decrypted text of a legacy encrypted PEM key file ("Proc-Type: 4,ENCRYPTED"), else None.

    paramiko before 3.5.1 leaves the cipher's padding on such a key once decrypted, which
    cryptography 45 and later reject ("ASN.1 parsing error"); cryptography itself decrypts
    it right with every paramiko. Raises SSHException for a wrong passphrase, with the
    message of paramiko 3.5.1 and later.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError:
        return None  # from_private_key_file reports it
    if passphrase is None or b"Proc-Type: 4,ENCRYPTED" not in data:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode())
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode("ascii")
    except ValueError as e:
        if "password" in str(e).lower():
            raise SSHException("Bad password or corrupt private key file") from None
        return None  # paramiko's own loader reports the problem
    except (TypeError, UnsupportedAlgorithm):
        return None


def _key_problem(problems: Sequence[BaseException]) -> str:
    """Why a key file could not be loaded, from the errors of each key class tried on it."""
    for problem in problems:
        if isinstance(problem, OSError):
            return problem.strerror or str(problem)
        if isinstance(problem, paramiko.PasswordRequiredException):
            return "it is encrypted and no passphrase (or password) was given"
    # Each key class also fails with "encountered EC key, expected RSA key" or "not a valid
    # RSA private key file" for a key of another type: those say nothing about this file.
    relevant = [p for p in problems if not _KEY_TYPE_MISMATCH.match(str(p))]
    return str((relevant or list(problems))[0])


def _peer(transport: paramiko.Transport) -> str:
    try:
        address = transport.getpeername()
        return f"{address[0]}:{address[1]}"
    except (OSError, AttributeError, TypeError, IndexError):
        return "the server"


def authenticate(
    transport: paramiko.Transport, creds: Credentials, *, host: Optional[str] = None,
    abandoned: Optional[Callable[[], bool]] = None,
) -> None:
    """Authenticate ``transport`` (after ``start_client``) with ``creds``; return when done.

    The first factor is ``creds.auth_strategy`` if given, else, in paramiko's order: ``pkey``,
    each of ``key_filenames`` (decrypted with ``passphrase``, or ``password`` if that is None),
    the agent's keys when ``allow_agent``, ``~/.ssh/id_{rsa,ecdsa,ed25519}`` when
    ``look_for_keys``, then ``password``, the first one sent at once (no "none" request first)
    and a method the server's refusals do not list skipped. The ``ssh-userauth`` service is
    asked for once per connection, not once per attempt. When the server answers with partial
    success, or allows keyboard-interactive only, keyboard-interactive follows: each prompt
    (stripped) equal to a configured ``mfa_config`` prompt (stripped) gets the current TOTP code, a
    password prompt gets ``password`` if given, an empty prompt list gets an empty answer. A
    TOTP code is never sent twice by any process of this user: see :class:`TOTPLedger`.
    ``host`` names the server in messages (default: the transport's peer address). A wait for
    a fresh TOTP time step ends once the transport is closed, or once ``abandoned()`` is true.

    Raises :class:`~paramiko_executor.results.AuthenticationFailure` (do not retry) when the
    server refuses every method, disconnects saying authentication failed, or asks a prompt
    nothing answers (then nothing is sent and the transport is closed), and
    :class:`~paramiko_executor.results.ExecutorFailure` (do not retry either) when the server
    disconnects for a protocol reason (protocol error, service not available, ...). Raises
    :class:`AuthenticationInterrupted` (a ``paramiko.SSHException``: temporary, may be retried
    on a new connection) when the transport dies or the server does not answer within
    ``transport.auth_timeout``; ``OSError`` from the socket may also propagate. After any
    exception the transport must be closed by the caller.
    """
    if transport.is_authenticated():
        return
    login = _Login(transport, creds, host, abandoned)

    def record_disconnect(original: Callable[[paramiko.Message], None]
                          ) -> Callable[[paramiko.Message], None]:
        def handle(message: paramiko.Message) -> None:
            # paramiko logs the server's disconnect reason but keeps no record of it; the
            # reason tells "too many authentication failures" apart from a dropped connection.
            position = message.packet.tell()
            code, text = message.get_int(), message.get_text()
            login.disconnect = (code, text)
            message.packet.seek(position)
            original(message)
        return handle

    undo = wrap_disconnect(transport, record_disconnect)
    try:
        login.run()
    finally:
        undo()
        if login.agent is not None:
            login.agent.close()
