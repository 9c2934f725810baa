#!/bin/sh
# Stratus context CD entry point: the guest's boot scripts run this from the
# mounted CD. The prolog checks the context first so that a damaged CD leaves
# the system untouched; the epilog then applies it.
#
# STRATUS_CONTEXT_ROOT (default /) is the root the scripts change, so the same
# scripts can be exercised against a scratch directory.
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || exit 1
sh "$here/prolog.sh" || exit 1
exec sh "$here/epilog.sh"
