#!/bin/bash
# StratusLab's tutorial, typed as its users typed it, against the cloud in one box
# (scripts/demo.sh): the `stratus-*` links, a configuration file made with
# stratus-copy-config, and a real Debian-kernel guest (the demo appliance) that the user
# reaches with SSH. On a machine without VT-x/AMD-V the node is the nested QEMU-TCG VM.
#
# It runs in a network namespace of its own (the box's TAP, bridge and addresses stay in
# it), with a home directory of its own; the box is brought down at the end.
# Prints "tutorial: N passed, M failed" and exits non-zero on any failure.
set -euo pipefail
if [ -z "${STRATUS_TUTORIAL_NETNS:-}" ]; then
    exec env STRATUS_TUTORIAL_NETNS=1 unshare --net -- "$0" "$@"
fi
ip link set lo up
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
W=$(mktemp -d "$REPO/target/tutorial.XXXX")
export STRATUS_CLOUD_DIR=$W/cloud STRATUS_PROFILE=${STRATUS_PROFILE:-debug} STRATUS_DEMO_VM=0
cleanup() { "$REPO/scripts/demo.sh" --down > /dev/null 2>&1 || true; rm -rf "$W"; }
trap cleanup EXIT

passed=0; failed=0
ok() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1"; }
# expect <description> <expected-output> <command...>
expect() {
    local what=$1 want=$2 got; shift 2
    if got=$("$@" 2>&1) && [ "$got" = "$want" ]; then ok "$what"; else fail "$what"; printf '     got: %s\n     want: %s\n' "$got" "$want"; fi
}

"$REPO/scripts/demo.sh" > "$W/box.log" 2>&1 || { cat "$W/box.log"; echo "tutorial: 0 passed, 1 failed (the box did not come up)"; exit 1; }
ok "the cloud in one box comes up ($(grep -o 'the cloud is up ([0-9]* s)' "$W/box.log"))"
IMAGE=$(cat "$STRATUS_CLOUD_DIR/image")
BOX_CFG=$STRATUS_CLOUD_DIR/stratuslab-user.cfg

# The user's own shell: a fresh home, the commands on PATH.
export HOME=$W/home PATH=$STRATUS_CLOUD_DIR/bin:$PATH
unset STRATUSLAB_CONFIG
mkdir -p "$HOME/.ssh"
cp "$STRATUS_CLOUD_DIR/.ssh/id_ed25519" "$STRATUS_CLOUD_DIR/.ssh/id_ed25519.pub" "$HOME/.ssh/"
expect "stratus-copy-config writes the reference file" \
    " :: Configuration template written to $HOME/.stratuslab/stratuslab-user.cfg" stratus-copy-config
# ... which the user then fills in, as the tutorial says.
{ cat "$HOME/.stratuslab/stratuslab-user.cfg"; sed -n '/^\[stratus-in-a-box\]/,$p' "$BOX_CFG" | grep -v '^user_public_key_file'; } > "$W/cfg"
sed -i 's/^\[default\]$/[default]\nselected_section = stratus-in-a-box/' "$W/cfg"
mv "$W/cfg" "$HOME/.stratuslab/stratuslab-user.cfg"
printf 'user_public_key_file = %s\n' "$HOME/.ssh/id_ed25519.pub" >> "$HOME/.stratuslab/stratuslab-user.cfg"

expect "stratus-describe-instance shows no machine yet" \
    "id  state     vcpu memory    cpu% host/ip                 name" stratus-describe-instance
if stratus-list-images | grep -q "^$IMAGE .*Debian 12 x86_64"; then ok "stratus-list-images shows the appliance"; else fail "stratus-list-images shows the appliance"; fi
expect "stratus-describe-volumes shows no volume yet" "No disk to show" stratus-describe-volumes
DISK=$(stratus-create-volume --size 1 --tag "tutorial data" | sed -n 's/^DISK //p')
[ -n "$DISK" ] && ok "stratus-create-volume makes a 1 GiB volume ($DISK)" || fail "stratus-create-volume"
if stratus-describe-volumes "$DISK" | grep -qx "$(printf '\ttag: tutorial data')"; then ok "stratus-describe-volumes shows its tag"; else fail "stratus-describe-volumes"; fi
expect "stratus-update-volume makes it public" "DISK $DISK" stratus-update-volume --public "$DISK"
if stratus-describe-volumes "$DISK" | grep -qx "$(printf '\tvisibility: public')"; then ok "... and describe-volumes shows it public"; else fail "update-volume's change is not shown"; fi
expect "stratus-delete-volume deletes it" "DELETED $DISK" stratus-delete-volume "$DISK"
expect "... and it is gone" "No disk to show" stratus-describe-volumes

stratus-run-instance -t t1.micro --wait=1800 "$IMAGE" > "$W/run.txt" 2>&1 || true
VM=$(sed -n 's/.*(vm ID: \([0-9]*\)).*/\1/p' "$W/run.txt")
if [ -n "$VM" ] && grep -q ":: Done!" "$W/run.txt"; then ok "stratus-run-instance --wait brings VM $VM to Running"; else fail "stratus-run-instance"; cat "$W/run.txt"; VM=0; fi
IP=$(sed -n 's/.*Public ip: //p' "$W/run.txt")
if stratus-describe-instance "$VM" | grep -qE "^$VM +Running +1 +524288 +- +$IP +one-$VM$"; then ok "stratus-describe-instance shows it Running at $IP"; else fail "stratus-describe-instance"; stratus-describe-instance "$VM" || true; fi

ssh_up() { stratus-connect-instance "$VM" true > /dev/null 2>&1; }
i=0; until ssh_up || [ $i -ge 450 ]; do sleep 2; i=$((i + 1)); done
cfg() { sed -n "s/^$1 = //p" "$BOX_CFG" | tail -1; }
ssh_up || { echo "     SSH did not answer; the guest's console:"; curl -s -u "demo:$(cfg password)" \
    "$(cfg endpoint)/vms/$VM/console?bytes=20000" | tail -n 40 | sed 's/^/     | /'; }
expect "stratus-connect-instance runs hostname in the guest: the name the cloud gave it" "one-$VM" \
    stratus-connect-instance "$VM" hostname
expect "the user's key is root's authorized key, from the context CD" "$(cat "$HOME/.ssh/id_ed25519.pub")" \
    stratus-connect-instance "$VM" cat /root/.ssh/authorized_keys
expect "the guest runs the stock Debian kernel" "$(cd "$REPO" && ls target/nested | sed -n 's/^kernel-//p' | head -1)" \
    stratus-connect-instance "$VM" uname -r

# A volume hot-plugged into the running guest, written there, unplugged: the data is in
# the volume.
DATA=$(stratus-create-volume --size 1 --tag "results" | sed -n 's/^DISK //p')
expect "stratus-attach-volume hot-plugs a volume into the running guest" \
    "ATTACHED $DATA in VM $VM on /dev/vdz" stratus-attach-volume -i "$VM" "$DATA"
SERIAL=$(printf %.20s "$DATA")
guest_dev() { stratus-connect-instance "$VM" "for b in /sys/block/vd*; do [ \"\$(cat \$b/serial)\" = $SERIAL ] && echo \${b##*/}; done; true"; }
DEV=$(guest_dev 2>/dev/null || true)
[ -n "$DEV" ] && ok "the guest sees it as /dev/$DEV (serial $SERIAL)" || fail "the guest has no disk with serial $SERIAL"
expect "the guest writes to it" "" stratus-connect-instance "$VM" \
    "echo stratus-tutorial-was-here | dd of=/dev/$DEV bs=512 conv=sync,fsync 2>/dev/null"
if stratus-describe-volumes "$DATA" | grep -q "mount: VM $VM on /dev/vdz since .*(attached, hot-plugged)"; then ok "stratus-describe-volumes shows where it is attached"; else fail "describe-volumes shows the mount"; stratus-describe-volumes "$DATA"; fi
expect "stratus-detach-volume unplugs it" "DETACHED $DATA from VM $VM on /dev/vdz" stratus-detach-volume -i "$VM" "$DATA"
expect "the guest no longer has it" "" guest_dev
if head -c 512 "$STRATUS_CLOUD_DIR/volumes/$DATA.img" | grep -aq stratus-tutorial-was-here; then ok "what the guest wrote is in the volume"; else fail "the guest's data is not in the volume"; fi
expect "the detached volume can be deleted" "DELETED $DATA" stratus-delete-volume "$DATA"

expect "stratus-shutdown-instance says nothing" "" stratus-shutdown-instance "$VM"
done_() { stratus-describe-instance "$VM" | grep -qE "^$VM +Done "; }
i=0; until done_ || [ $i -ge 300 ]; do sleep 2; i=$((i + 1)); done
if done_; then ok "the guest powers off and the VM is Done"; else fail "the VM is Done"; stratus-describe-instance -vvv "$VM" || true; fi

cp -r "$STRATUS_CLOUD_DIR/logs" "$W/logs"
"$REPO/scripts/demo.sh" --down > "$W/down.log" 2>&1 && ok "demo.sh --down stops the box" || { fail "demo.sh --down"; cat "$W/down.log"; }
left=$(pgrep -f -- "$STRATUS_CLOUD_DIR" || true)
[ -z "$left" ] && ok "no process of the box is left" || { fail "processes left: $left"; }
[ ! -e "$STRATUS_CLOUD_DIR" ] && ok "its state is removed" || fail "its state is removed"
ip link show stratusbox0 > /dev/null 2>&1 && fail "the TAP is left" || ok "the TAP is removed"

if [ $failed -ne 0 ]; then
    echo "---- box log ----"; tail -n 30 "$W/box.log"
    for f in "$W"/logs/*.log; do [ -e "$f" ] && { echo "---- $f ----"; tail -n 30 "$f"; }; done
fi
echo "tutorial: $passed passed, $failed failed"
[ $failed -eq 0 ]
