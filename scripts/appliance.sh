# The demo appliance: a small bootable Debian-kernel machine image as a cloud user gets it
# from the Marketplace. Source after scripts/nested/lib.sh and call fetch_kernel first.
#
#   build_appliance <out.img>
#
# The image is a whole disk: an MBR partition table and one ext4 partition (made with
# mke2fs -d, no loop device) holding
#   /boot/vmlinuz-KVER, /boot/initrd.img-KVER  the stock Debian kernel, and an initramfs
#                                              that loads the disk drivers, finds root=UUID=
#                                              and switches to it;
#   busybox, dropbear (Debian's, with its libraries), the network and CD modules;
#   /sbin/init                                 mounts the HEPiX context CD and runs its
#                                              init.sh (installs root's SSH key, runs
#                                              SCRIPT_EXEC), takes its address and host name
#                                              by DHCP, starts dropbear, powers off on the
#                                              ACPI power button.

build_appliance() {
    local out=$1 w tree initrd lib
    w=$(mktemp -d "$NESTED_WORK/appliance.XXXX")
    tree=$w/root; initrd=$w/initrd
    busybox_root "$tree"
    mkdir -p "$tree"/{sbin,usr/bin,usr/sbin,etc/dropbear,root,run,var/log,boot,mnt/context,newroot}
    chmod 700 "$tree/root"
    copy_binary_with_libs dropbear "$tree" || return 1
    mv "$tree/usr/bin/dropbear" "$tree/usr/sbin/dropbear"
    copy_modules "$tree/lib/modules" virtio_pci virtio_blk virtio_net isofs button evdev
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$tree/etc/passwd"
    printf 'root:x:0:\n' > "$tree/etc/group"
    # '*': no password login, but not "locked" (dropbear refuses locked accounts' keys too).
    printf 'root:*:19000:0:99999:7:::\n' > "$tree/etc/shadow"
    chmod 600 "$tree/etc/shadow"
    printf '/bin/sh\n' > "$tree/etc/shells"
    printf 'stratus-appliance\n' > "$tree/etc/hostname"
    cat > "$tree/etc/udhcpc.script" <<'SCRIPT'
#!/bin/sh
# udhcpc's hook: the address, route, name and resolvers the cloud's DHCP server gives.
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    [ -n "$hostname" ] && hostname "$hostname"
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "stratus-appliance: $interface has $ip, host name $(hostname)" > /dev/console
    ;;
esac
SCRIPT
    chmod +x "$tree/etc/udhcpc.script"
    cat > "$tree/sbin/init" <<'INIT'
#!/bin/sh
# The appliance's whole boot: PID 1 from the initramfs's switch_root.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts; mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmp /tmp; mount -t tmpfs run /run
mount -o remount,rw /
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
hostname -F /etc/hostname
ip link set lo up
echo "stratus-appliance: booting $(uname -r)" > /dev/console

# The HEPiX context CD (volume label _STRATUSLAB): root's key, the user's script.
label() { dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' '; }
for d in /dev/vd? /dev/sr?; do
    [ -b "$d" ] && [ "$(label "$d")" = _STRATUSLAB ] || continue
    if mount -t iso9660 -o ro "$d" /mnt/context; then
        sh /mnt/context/init.sh > /dev/console 2>&1 &&
            echo "stratus-appliance: context applied from $d" > /dev/console
    fi
done

for nic in /sys/class/net/eth*; do
    [ -e "$nic" ] && udhcpc -b -i "${nic##*/}" -s /etc/udhcpc.script -x hostname:stratus-appliance
done
dropbear -R -s -p 22 && echo "stratus-appliance: SSH server started" > /dev/console

# The ACPI power button (the cloud's shutdown-instance) ends the machine cleanly.
for e in /sys/class/input/event*; do
    if [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ]; then
        (dd if="/dev/input/${e##*/}" bs=24 count=1 of=/dev/null 2>/dev/null
         echo "stratus-appliance: power button: powering off" > /dev/console
         killall dropbear udhcpc 2>/dev/null; sync; umount -a -r 2>/dev/null
         poweroff -f) &
    fi
done
echo "stratus-appliance: ready" > /dev/console
while :; do wait; sleep 60; done
INIT
    chmod +x "$tree/sbin/init"
    # Every other busybox applet at its usual path. Made last: writing a file of the tree
    # through one of these links would write this machine's /bin/busybox.
    while read -r applet; do
        [ -e "$tree/$applet" ] || [ -L "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
    done < <(busybox --list-full)

    # The initramfs: disk drivers and ext4, then root=UUID=… or root=/dev/… by findfs.
    busybox_root "$initrd"
    mkdir -p "$initrd/newroot"
    # ext4 checksums its metadata with crc32c, which the crypto API loads on demand.
    copy_modules "$initrd/lib/modules" virtio_pci virtio_blk crc32c_generic ext4
    write_init "$initrd" <<'INIT'
root=
for arg in $(cat /proc/cmdline); do case $arg in root=*) root=${arg#root=} ;; esac; done
dev=
i=0
while [ $i -lt 100 ]; do
    dev=$(findfs "$root" 2>/dev/null) && [ -b "$dev" ] && break
    dev=; sleep 0.1; i=$((i + 1))
done
[ -n "$dev" ] || { echo "initramfs: no root device $root"; sleep 5; poweroff -f; }
mount -t ext4 "$dev" /newroot || { echo "initramfs: cannot mount $dev"; sleep 5; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
INIT
    pack_initramfs "$initrd" "$tree/boot/initrd.img-$KVER"
    cp "$BZIMAGE" "$tree/boot/vmlinuz-$KVER"

    # One ext4 partition from 1 MiB on, in an MBR disk, without a loop device.
    local size_mib=$(( $(du -sm "$tree" | cut -f1) + 48 ))
    mke2fs -q -t ext4 -L stratus-root -d "$tree" "$w/root.ext4" "${size_mib}M" > /dev/null
    # A fresh file: dd's sparse copy skips zero blocks, so old bytes must not be there.
    rm -f "$out.tmp"
    truncate -s $(( (size_mib + 1) * 1024 * 1024 )) "$out.tmp"
    printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$out.tmp" > /dev/null
    dd if="$w/root.ext4" of="$out.tmp" bs=1M seek=1 conv=notrunc,sparse status=none
    mv "$out.tmp" "$out"
    rm -rf "$w"
}
