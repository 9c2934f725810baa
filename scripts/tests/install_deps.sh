#!/bin/bash
# Tests scripts/install-deps.sh's final check (--check-only) without touching the system's
# packages: a fake apt-get on PATH proves no install is attempted, and a fake dpkg-query
# stands in for a machine with mixed QEMU versions.
set -uo pipefail
cd "$(dirname "$0")/../.."
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir "$T/bin"
printf '#!/bin/sh\ntouch %s/apt-get-called\nexit 1\n' "$T" > "$T/bin/apt-get"
chmod +x "$T/bin/apt-get"
passed=0; failed=0
ok() { echo "ok: $1"; passed=$((passed + 1)); }
fail() { echo "FAILED: $1"; failed=$((failed + 1)); }

# expect <name> <wanted-exit> <text-in-stderr-or-empty> <list-contents> [PATH prefix]
expect() {
    local name=$1 want=$2 text=$3 contents=$4 path=${5:-$T/bin}
    printf '%s\n' "$contents" > "$T/list.txt"
    PATH="$path:$PATH" bash scripts/install-deps.sh --check-only "$T/list.txt" 2> "$T/err"
    local rc=$?
    if [ "$rc" != "$want" ]; then fail "$name: exit $rc, wanted $want ($(cat "$T/err"))"; return; fi
    if [ -n "$text" ] && ! grep -qF -- "$text" "$T/err"; then fail "$name: stderr lacks '$text': $(cat "$T/err")"; return; fi
    if [ "$want" != 0 ] && [ "$(wc -l < "$T/err")" != 1 ]; then fail "$name: not one line: $(cat "$T/err")"; return; fi
    ok "$name"
}

expect "installed package and its commands pass" 0 "" "coreutils  # provides: ls cat"
expect "a package that is not installed is named" 1 "packages not installed: stratus-no-such-package" \
    $'# header\ncoreutils # provides: ls\nstratus-no-such-package'
expect "a missing command is named" 1 "commands not on PATH: stratus-no-such-command" \
    "coreutils  # provides: ls stratus-no-such-command"
expect "both are named in one line" 1 "stratus-no-such-command" \
    $'stratus-no-such-package\ncoreutils  # provides: stratus-no-such-command'

# A machine where apt mixed QEMU suites: fake dpkg-query reports every package installed but
# two different qemu-* versions.
mkdir "$T/mixed"
cat > "$T/mixed/dpkg-query" <<'FAKE'
#!/bin/sh
case "$*" in
  *"qemu-*"*) printf 'ii qemu-system-x86 1:7.2\nii qemu-utils 1:10.0.2\nii qemu-system-data 1:10.0.2\n' ;;
  *) echo "install ok installed" ;;
esac
FAKE
chmod +x "$T/mixed/dpkg-query"
expect "mixed QEMU versions are refused" 1 "QEMU packages of different versions installed: 1:10.0.2 1:7.2" \
    "qemu-utils  # provides: ls" "$T/bin:$T/mixed"

if [ -e "$T/apt-get-called" ]; then fail "--check-only called apt-get"; else ok "--check-only never calls apt-get"; fi
bash scripts/install-deps.sh --check-only "$T/does-not-exist" 2>/dev/null
[ $? = 2 ] && ok "an unreadable list is a usage error" || fail "an unreadable list is not exit 2"

echo "install-deps: $passed passed, $failed failed"
[ "$failed" = 0 ]
