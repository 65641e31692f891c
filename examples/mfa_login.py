"""Multi-factor login: a key first, then a TOTP code for a keyboard-interactive prompt.

    python examples/mfa_login.py          # against the built-in test server, which asks for a code
    TOTP_SECRET=BASE32... python examples/mfa_login.py --host login.example.org --user clown \\
        --prompt "Enter 2FA Token:"

``mfa_config`` lists the prompts the server asks and the base32 TOTP secret
(the one behind your authenticator app's QR code) that answers each. Keep the
secret out of code and version control: here it comes from an environment variable.
"""

import os

import _target
import pyotp

from paramiko_executor import AuthenticationFailure, SSHExecutor


def main() -> int:
    parser = _target.parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--prompt", default="Enter 2FA Token:",
        help="the server's one-time-code prompt (default: %(default)r)",
    )
    parser.add_argument(
        "--secret-env", default="TOTP_SECRET", metavar="VAR",
        help="environment variable holding the base32 TOTP secret (default: %(default)s)",
    )
    args = parser.parse_args()

    if args.host is None:
        # the test server gets a fresh secret and asks the prompt after the key
        secret = pyotp.random_base32()
    elif args.secret_env in os.environ:
        secret = os.environ[args.secret_env]
    else:
        parser.error(f"set {args.secret_env} to your TOTP secret")

    mfa_config = [{"prompt": args.prompt, "totp": secret}]
    with _target.target(args, totp_secret=secret, totp_prompts=[args.prompt]) as parameters:
        try:
            with SSHExecutor(mfa_config=mfa_config, **parameters) as executor:
                result = executor.run_command("echo logged in as $(id -un)")
        except AuthenticationFailure as failure:
            # e.g. the server asked a prompt that mfa_config does not list
            print(f"login failed: {failure}")
            return 1
        print(result.stdout.strip(), "after the key and a TOTP code")
        print(f"executor: {executor!r} (the secret never shows in repr, errors or logs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
