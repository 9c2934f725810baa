#!/bin/sh
# Refuses to go on unless context.sh is present and parses: sourcing a broken
# file would run part of it and leave the guest half-configured.
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
if [ ! -r "$here/context.sh" ]; then
    echo "stratus-context: $here/context.sh is missing" >&2
    exit 1
fi
if ! sh -n "$here/context.sh"; then
    echo "stratus-context: $here/context.sh does not parse" >&2
    exit 1
fi
exit 0
