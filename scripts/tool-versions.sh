#!/bin/bash
# Prints the versions of the external tools the tests and the main job call, one line each,
# so a CI log shows which set a run used.
set -uo pipefail
first_line() { "$@" 2>&1 | grep -m1 -v '^$' || true; }
printf '%-22s %s\n' rustc "$(first_line rustc --version)"
printf '%-22s %s\n' cargo "$(first_line cargo --version)"
for pkg in qemu-system-x86 qemu-utils seabios busybox-static fio xorriso mtools xmlsec1 cloud-init openssl e2fsprogs; do
    printf '%-22s %s\n' "$pkg" "$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || echo 'not installed')"
done
printf '%-22s %s\n' qemu-system-x86_64 "$(first_line qemu-system-x86_64 --version)"
printf '%-22s %s\n' qemu-img "$(first_line qemu-img --version)"
printf '%-22s %s\n' fio "$(first_line fio --version)"
printf '%-22s %s\n' linux "$(uname -r)"
# A full disk shows up as a linker killed by SIGBUS; the free space makes that readable.
printf '%-22s %s\n' "disk free (target)" "$(df -h --output=avail "${CARGO_TARGET_DIR:-target}" 2>/dev/null | tail -1 || df -h --output=avail . | tail -1)"
