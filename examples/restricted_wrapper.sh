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
#
# A key allowed sbatch IS A SHELL, whatever this wrapper does: the job script is any
# program, run as the key's user on a node that mounts the same home directory
# (so it can rewrite ~/.ssh/authorized_keys and drop the restriction); its options
# are worse still on the command line: "sbatch --wrap='any command'" needs no script,
# "sbatch --output=~/.ssh/authorized_keys" writes the job's output over the keys.
# Refusing options (below) only closes the command-line route; #SBATCH lines in the
# script set the same options. Allow sbatch on a command key only where the key
# could have a shell anyway, and treat every allowed command the same way: read its
# manual for options that run programs or write files (--output, --chdir, --wrap,
# --export, --get-user-env, ...).
#
# Two ways to keep options out of an allowed command:
#   - refuse every word that starts with "-" (done here for sbatch and scancel:
#     sbatch takes its script on stdin, scancel only job ids);
#   - or force the end of options, for commands that understand "--":
#         exec "${words[0]}" -- "${words[@]:1}"
#     then "--wrap=..." is an operand (a file name), never an option.
# squeue only shows jobs, so its options (--me, -u USER, --format) stay allowed.
set -u

readonly ALLOWED=(squeue sbatch scancel)
# allowed commands whose arguments may not be options (see above)
readonly NO_OPTIONS=(sbatch scancel)

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

for command in "${NO_OPTIONS[@]}"; do
    if [[ "${words[0]}" == "$command" ]]; then
        for word in "${words[@]:1}"; do
            if [[ "$word" == -* ]]; then
                echo "restricted_wrapper: options are not allowed for ${words[0]}: '$word'" >&2
                exit 126
            fi
        done
    fi
done

for allowed in "${ALLOWED[@]}"; do
    if [[ "${words[0]}" == "$allowed" ]]; then
        # exec: no shell sees the words, the command inherits the rest of stdin
        exec "${words[@]}"
    fi
done

echo "restricted_wrapper: '${words[0]}' is not allowed (allowed: ${ALLOWED[*]})" >&2
exit 126
