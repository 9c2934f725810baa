#!/bin/sh
# Applies the context: installs PUBLIC_KEY for root, then runs SCRIPT_EXEC with
# every context key in its environment (as StratusLab's epilog did).
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
# Read before sourcing, so a context key cannot move the target root.
root=${STRATUS_CONTEXT_ROOT:-/}
root=${root%/}

# Not exported here: a large context in the environment of every command below could
# stop them starting ("argument list too long") and leave the VM without its key.
. "$here/context.sh"

if [ -n "${PUBLIC_KEY:-}" ]; then
    # A subshell, so that the strict umask does not reach SCRIPT_EXEC.
    (
        ssh_dir="$root/root/.ssh"
        keys="$ssh_dir/authorized_keys"
        umask 077
        mkdir -p "$ssh_dir" || exit 1
        # sshd ignores keys when the directory or file is group/world accessible.
        chmod 700 "$ssh_dir" || exit 1
        [ -f "$keys" ] || : > "$keys" || exit 1
        chmod 600 "$keys" || exit 1
        # Append each key once: the epilog runs at every boot and must keep
        # keys that were added inside the VM.
        printf '%s\n' "$PUBLIC_KEY" | while IFS= read -r key || [ -n "$key" ]; do
            [ -n "$key" ] || continue
            grep -qxF -- "$key" "$keys" || printf '%s\n' "$key" >> "$keys" || exit 1
        done
    ) || { echo "stratus-context: cannot install the SSH key under $root/root/.ssh" >&2; exit 1; }
fi

if [ -n "${SCRIPT_EXEC:-}" ]; then
    script=$(mktemp "${TMPDIR:-/tmp}/stratus-script.XXXXXX") || exit 1
    printf '%s\n' "$SCRIPT_EXEC" > "$script"
    # allexport: the keys reach SCRIPT_EXEC without parsing context.sh by hand.
    (
        set -a
        . "$here/context.sh"
        set +a
        exec sh "$script"
    )
    status=$?
    rm -f "$script"
    exit "$status"
fi
exit 0
