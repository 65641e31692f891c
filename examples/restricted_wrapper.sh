#!/bin/bash
# restricted_wrapper.sh: the forced command of an SSH "command key" that may only
# run squeue, sbatch and scancel. Install it on the server, then restrict the key:
#
#   # ~/.ssh/authorized_keys (one line)
#   command="/home/clown/bin/restricted_wrapper.sh",no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty ssh-ed25519 AAAA...
#
# and use it with DupingSSHExecutor(wrapper="/home/clown/bin/restricted_wrapper.sh", ...).
# The executor writes the command as the first line of stdin; whatever follows
# (stdin_input, e.g. a job script for sbatch) is left for the command to read.
#
# Why it is written this way: a wrapper that hands its input to a shell (eval,
# bash -c, "$line" unquoted in a shell, /bin/bash itself as wrapper) gives the key
# a full shell, and the command= restriction protects nothing. This one never
# lets a shell interpret the line: it splits it into words on blanks (no quotes,
# no $variables, no globbing, no ; | & or $( ) are interpreted), checks the first
# word against the allowlist and execs the words directly.
# The allowed commands are broad themselves: sbatch runs any job script (and
# "sbatch --wrap" any command line) on the batch system, as the key's user.
set -u

readonly ALLOWED=(squeue sbatch scancel)

# the command line, exactly one line; nothing at all is an error too
if ! IFS= read -r line; then
    echo "restricted_wrapper: no command given" >&2
    exit 126
fi

# split on blanks only; -f: no pathname expansion of the words
set -f
read -r -a words <<< "$line"
set +f

if (( ${#words[@]} == 0 )); then
    echo "restricted_wrapper: empty command" >&2
    exit 126
fi

for allowed in "${ALLOWED[@]}"; do
    if [[ "${words[0]}" == "$allowed" ]]; then
        # exec: no shell sees the words, the command inherits the rest of stdin
        exec "${words[@]}"
    fi
done

echo "restricted_wrapper: '${words[0]}' is not allowed (allowed: ${ALLOWED[*]})" >&2
exit 126
