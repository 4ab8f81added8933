#!/usr/bin/env bash
# Builds the arm64 (QEMU virt, U-Boot) test image for omaha-agent (needs root; no loop mounts):
#   build/qemu-arm64/disk.img              GPT: BOOT (FAT: boot.scr from config/uboot/boot.cmd and the two
#                                          copies of the U-Boot env), ROOT-A (1.0.0), ROOT-B (empty, bad), STATE
#   build/qemu-arm64/payload-2.0.0.ext4.zst   the same root filesystem with VERSION_ID=2.0.0
#   build/qemu-arm64/payload-3.0.0.ext4.zst   version 3.0.0 whose init fails at once (the kernel panics, panic=5)
# The Debian arm64 root filesystem comes from mmdebstrap under qemu-user (binfmt_misc) with this machine's own
# apt sources and is cached by a key of its inputs (build/qemu-arm64/base-KEY.tar). The agent is installed on top
# from its Debian package (make deb) with apt inside the tree (under qemu-user), and the factory boot state is
# written by `omaha-agent provision` (run on the build host from the working tree: OMAHA_AGENT).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUT=${OUT:-$REPO/build/qemu-arm64}
SOURCES=${APT_SOURCES:-}
if [ -z "$SOURCES" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then SOURCES=$f; break; fi
  done
fi
[ -n "$SOURCES" ] || { echo "build-image-arm64: no apt sources found; set APT_SOURCES=FILE" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "build-image-arm64: needs root (mmdebstrap --mode=root, files owned by root)" >&2; exit 1; }

DEB=${DEB:-$(ls "$REPO"/build/deb/omaha-agent_*_all.deb 2>/dev/null | tail -n 1)}
[ -n "$DEB" ] && [ -s "$DEB" ] || { echo "build-image-arm64: no omaha-agent .deb: run make deb (make qemu-image-arm64 does)" >&2; exit 1; }
OMAHA_AGENT=${OMAHA_AGENT:-$REPO/.venv/bin/omaha-agent}
[ -x "$OMAHA_AGENT" ] || { echo "build-image-arm64: $OMAHA_AGENT is missing: run make venv (make qemu-image-arm64 does)" >&2; exit 1; }

PORT=${OMAHA_TEST_PORT:-18080}      # the dev server inside the test's network namespace (guest: 10.0.2.2)
APPID="{6f3c1a52-9c1e-4d9b-8a57-6d2f0c1e9a11}"
FS_SIZE=${FS_SIZE:-640M}
PART_MIB=${PART_MIB:-800}
BOOT_MIB=64
STATE_MIB=32
ENV_SIZE=0x4000   # each copy of the U-Boot env (config/uboot/boot.cmd and fw_env.config agree on it)

PACKAGES=systemd-sysv,udev,kmod,initramfs-tools,linux-image-arm64,python3,python3-aiohttp,python3-yaml
PACKAGES=$PACKAGES,python3-defusedxml,python3-pyudev,python3-dbus-next,python3-zstandard,dbus,libubootenv-tool
PACKAGES=$PACKAGES,util-linux,e2fsprogs,python3-cryptography
# the agent's package installs offline on top of the cached base: every Python package it depends on or
# recommends must be in the base (a change here changes the cache key, so the base is built again)
for dep in $(dpkg-deb -f "$DEB" Depends Recommends | grep -o 'python3-[a-z0-9.+-]*' | sort -u); do
  case ",$PACKAGES," in *",$dep,"*) ;; *) echo "build-image-arm64: $(basename "$DEB") needs $dep: add it to PACKAGES" >&2; exit 1;; esac
done

# under qemu-user every initramfs build takes ~15 min with initramfs-tools' defaults (all modules, zstd):
# only what the root needs, gzip, set before the kernel is installed
INITRAMFS_MODULES="virtio_mmio virtio_blk virtio_pci ext4 crc32c_generic"
PRUNE="sound drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/infiniband
drivers/staging drivers/bluetooth drivers/iio drivers/isdn drivers/scsi drivers/usb drivers/hid drivers/input
drivers/video drivers/mtd drivers/nfc drivers/net/can drivers/net/usb drivers/hwmon
drivers/misc drivers/md drivers/target drivers/thunderbolt drivers/edac net/wireless net/mac80211
net/bluetooth net/netfilter net/ipv4/netfilter net/ipv6/netfilter net/sched fs/btrfs fs/xfs fs/ocfs2
fs/nfs fs/nfsd fs/cifs fs/smb fs/gfs2 fs/f2fs fs/ceph fs/jfs fs/nilfs2 fs/ubifs fs/reiserfs"

if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || {
  echo "build-image-arm64: qemu-aarch64 is not registered in binfmt_misc (apt-get install qemu-user-static binfmt-support)" >&2; exit 1; }

mkdir -p "$OUT"
KEY=$( (echo "$PACKAGES"; echo "$INITRAMFS_MODULES"; echo "$PRUNE"; cat "$SOURCES"; echo arm64-v2) | sha256sum | cut -c1-16)
BASE=$OUT/base-$KEY.tar

if [ ! -s "$BASE" ]; then
  echo "build-image-arm64: building the Debian arm64 root filesystem under qemu-user (cache key $KEY)"
  # (mkinitramfs reads its list from /etc/initramfs-tools/modules, a conffile, and /usr/share/initramfs-tools/modules.d)
  setup='set -e; mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d";
         printf "MODULES=list\nCOMPRESS=gzip\n" > "$1/etc/initramfs-tools/conf.d/omaha-qemu.conf";
         for m in '"$INITRAMFS_MODULES"'; do echo $m; done > "$1/usr/share/initramfs-tools/modules.d/omaha-qemu"'
  hook='set -e; for k in "$1"/usr/lib/modules/*; do v=$(basename "$k"); for d in '"$(echo $PRUNE)"'; do
        rm -rf "$k/kernel/$d"; done; chroot "$1" depmod -a "$v"; done;
        rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*'
  mmdebstrap --mode=root --arch=arm64 --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --setup-hook="$setup" --customize-hook="$hook" \
    bookworm "$OUT/partial-$KEY.tar" "$SOURCES"
  tar -tf "$OUT/partial-$KEY.tar" | grep 'initramfs-tools/modules.d/omaha-qemu$' >/dev/null || {
    echo "build-image-arm64: the initramfs module list is missing from the root filesystem" >&2; exit 1; }
  mv "$OUT/partial-$KEY.tar" "$BASE"
  find "$OUT" -maxdepth 1 -name 'base-*.tar' ! -name "base-$KEY.tar" -delete
fi

WORK=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/root
mkdir "$TREE"
tar -C "$TREE" -xf "$BASE"

# ---- the agent from its Debian package (apt inside the tree, arm64 binaries under qemu-user: the postinst
# creates the group, enables the units), and a config for this image
cp "$DEB" "$TREE/tmp/omaha-agent.deb"
chroot "$TREE" sh -c 'cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./omaha-agent.deb' \
  >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; echo "build-image-arm64: apt could not install $DEB" >&2; exit 1; }
rm -rf "$TREE/tmp/omaha-agent.deb" "$TREE"/var/cache/apt/*.bin "$TREE/run/omaha-agent"
chroot "$TREE" dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\n' omaha-agent
cat > "$TREE/etc/omaha-agent/agent.yaml" <<EOF
server: {url: "http://10.0.2.2:$PORT/v1/update/", insecure_http: true, timeout: 20}
app: {id: "$APPID", track: stable, board: arm64-virt}
slots:
  a: {partlabel: ROOT-A}
  b: {partlabel: ROOT-B}
boot: {backend: uboot, fw_config: /etc/fw_env.config, tries: 2}
state_dir: /var/lib/omaha-agent
schedule: {initial_delay: 0, interval: 3600, backoff_base: 10, backoff_cap: 60}
reboot: {policy: immediate}
health: {commands: ["test -r /etc/os-release"], after: boot-complete, boot_complete_timeout: 300}
install: {read_timeout: 30}
trust: {require_signature: true, keys: [/etc/omaha-agent/keys/*.pem]}
EOF
[ -s "$OUT/release-key.pem" ] || openssl genpkey -algorithm ed25519 -out "$OUT/release-key.pem" 2>/dev/null
openssl pkey -in "$OUT/release-key.pem" -pubout -out "$TREE/etc/omaha-agent/keys/release.pem"
# the U-Boot env: two copies (libubootenv's redundant pair) in files on the FAT boot partition
install -D -m 0644 "$TREE/usr/share/omaha-agent/uboot/fw_env.config" "$TREE/etc/fw_env.config"   # the package's
mkdir -p "$TREE/boot/firmware" "$TREE/etc/systemd/system/omaha-agent.service.d"
# fw_setenv writes the env files and takes its lock in /var/lock
printf '[Service]\nReadWritePaths=/boot/firmware -/run/lock\n' \
  > "$TREE/etc/systemd/system/omaha-agent.service.d/uboot-env.conf"
cat > "$TREE/etc/fstab" <<'EOF'
/dev/root        /                     ext4  rw,errors=remount-ro        0  0
PARTLABEL=BOOT   /boot/firmware        vfat  umask=0077,shortname=winnt  0  2
PARTLABEL=STATE  /var/lib/omaha-agent  ext4  rw,nodev,nosuid,noexec      0  2
EOF
echo omaha-qemu-arm64 > "$TREE/etc/hostname"
mkdir -p "$TREE/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$TREE/etc/systemd/network/50-dhcp.network"
install -m 0755 "$HERE/guest/omaha-test-report" "$TREE/usr/local/bin/omaha-test-report"
install -m 0755 "$HERE/guest/omaha-test-watch" "$TREE/usr/local/bin/omaha-test-watch"
install -m 0644 "$HERE/guest/omaha-test-report.service" "$TREE/etc/systemd/system/omaha-test-report.service"
systemctl --root="$TREE" enable systemd-networkd.service omaha-test-report.service >/dev/null 2>&1
for unit in omaha-agent.service omaha-agent-confirm.service; do  # enabled by the package's postinst
  [ -L "$TREE/etc/systemd/system/multi-user.target.wants/$unit" ] || {
    echo "build-image-arm64: the package did not enable $unit" >&2; exit 1; }
done
systemctl --root="$TREE" mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
# the kernel (an uncompressed Image on arm64) and initrd live in the slot: boot.scr loads /vmlinuz and
# /initrd.img from the chosen partition
[ -e "$TREE/vmlinuz" ] && [ -e "$TREE/initrd.img" ] || { echo "build-image-arm64: no /vmlinuz in the tree" >&2; exit 1; }

os_release() {
  rm -f "$TREE/etc/os-release"
  sed "/^VERSION_ID=/d" "$TREE/usr/lib/os-release" > "$TREE/etc/os-release"
  echo "VERSION_ID=$1" >> "$TREE/etc/os-release"
}
mkfs_root() {
  rm -f "$2"
  mkfs.ext4 -q -F -L rootfs -E root_owner=0:0 -d "$TREE" "$2" "$FS_SIZE"
}

os_release 1.0.0
mkfs_root 1.0.0 "$WORK/root-1.0.0.ext4"
os_release 2.0.0
mkfs_root 2.0.0 "$WORK/root-2.0.0.ext4"
os_release 3.0.0
rm -f "$TREE/sbin/init" "$TREE/usr/sbin/init"
printf '#!/bin/sh\necho "omaha-test: version 3.0.0 has a broken init" >&2\nexit 1\n' > "$TREE/usr/sbin/init"
chmod 0755 "$TREE/usr/sbin/init"
mkfs_root 3.0.0 "$WORK/root-3.0.0.ext4"
zstd -q -f -T0 -3 "$WORK/root-2.0.0.ext4" -o "$OUT/payload-2.0.0.ext4.zst"
zstd -q -f -T0 -3 "$WORK/root-3.0.0.ext4" -o "$OUT/payload-3.0.0.ext4.zst"

# ---- the boot partition: boot.scr (U-Boot's distro boot runs it) from the package's boot.cmd, and the env pair
# in the factory state (A good with 1.0.0, B bad, nothing armed): provision reads the image's /etc/fw_env.config
# and writes the files it names inside the tree (/boot/firmware/uboot.env and uboot-redund.env, created blank
# at ENV_SIZE); one good copy (flags 1), the other stays blank (a bad CRC) until the first write goes there
BOOTCMD=$TREE/usr/share/omaha-agent/uboot/boot.cmd
mkimage -A arm64 -T script -C none -n "omaha-agent A/B" -d "$BOOTCMD" "$WORK/boot.scr" >/dev/null
rm -f "$TREE/boot/firmware/uboot.env" "$TREE/boot/firmware/uboot-redund.env"
"$OMAHA_AGENT" provision --config "$TREE/etc/omaha-agent/agent.yaml" --slot a --version 1.0.0 --image-root "$TREE"
for f in uboot.env uboot-redund.env; do
  [ "$(stat -c %s "$TREE/boot/firmware/$f")" = $((ENV_SIZE)) ] || { echo "build-image-arm64: $f is not $ENV_SIZE bytes" >&2; exit 1; }
done
sed "s|/boot/firmware/|$TREE/boot/firmware/|" "$TREE/etc/fw_env.config" > "$WORK/fw_env.config"
fw_printenv -c "$WORK/fw_env.config" BOOT_ORDER >/dev/null
mkfs.vfat -n BOOT -C "$WORK/boot.img" $((BOOT_MIB * 1024)) >/dev/null
mcopy -i "$WORK/boot.img" "$WORK/boot.scr" "$BOOTCMD" "$TREE/boot/firmware/uboot.env" "$TREE/boot/firmware/uboot-redund.env" ::/

# ---- the disk
DISK=$OUT/disk.img
rm -f "$DISK"
truncate -s $(( (1 + BOOT_MIB + 2 * PART_MIB + STATE_MIB + 1) * 1024 * 1024 )) "$DISK"
sfdisk -q "$DISK" <<EOF
label: gpt
start=1MiB, size=${BOOT_MIB}MiB, type=uefi, name=BOOT
size=${PART_MIB}MiB, type=linux, name=ROOT-A
size=${PART_MIB}MiB, type=linux, name=ROOT-B
size=${STATE_MIB}MiB, type=linux, name=STATE
EOF
dd if="$WORK/boot.img" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root-1.0.0.ext4" of="$DISK" bs=1M seek=$((1 + BOOT_MIB)) conv=notrunc,sparse status=none
mkfs.ext4 -q -F -L state "$WORK/state.ext4" ${STATE_MIB}M
dd if="$WORK/state.ext4" of="$DISK" bs=1M seek=$((1 + BOOT_MIB + 2 * PART_MIB)) conv=notrunc,sparse status=none
echo "$APPID" > "$OUT/appid"
echo "$PORT" > "$OUT/port"
ls -l "$DISK" "$OUT"/payload-*.zst
echo "build-image-arm64: done"
