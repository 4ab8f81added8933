#!/usr/bin/env bash
# Builds the amd64-generic test image for omaha-agent (needs root; no loop mounts):
#   build/qemu/disk.img              GPT: ESP (GRUB EFI + grubenv), ROOT-A (version 1.0.0), ROOT-B (empty, bad),
#                                    STATE (the agent's state dir, shared by both slots)
#   build/qemu/payload-2.0.0.ext4.zst   the same root filesystem with VERSION_ID=2.0.0
#   build/qemu/payload-3.0.0.ext4.zst   version 3.0.0 whose init fails at once (the kernel panics, panic=5)
#   build/qemu/payload-2.0.0.ext4.cidx/.czst, payload-2.1.0.ext4.cidx/.czst   2.0.0 and 2.1.0 (2.0.0's tree with a
#                                    few files changed and added) cut for adaptive updates (omaha-agent chunk, zstd 3)
# Every root filesystem is made deterministically (fixed UUID and hash seed, E2FSPROGS_FAKE_TIME): an unchanged
# file makes the same blocks in 2.0.0 and 2.1.0, so the adaptive update fetches only what changed.
# LAYOUT=groups builds the slot-groups twin (disk-groups.img, GRUB): each slot is a pair, a root filesystem
# (ROOT-X) and a kernel partition (KERN-X: an ext2 filesystem holding vmlinuz, initrd.img and kern.cfg, which
# names its release); GRUB loads the kernel from the chosen slot's KERN partition and passes omaha_test.kern=V;
# a release is two packages, rootfs-V.ext4.zst and kernel-V.img.zst (build/qemu/groups/).
# BOOTLOADER=systemd-boot builds the systemd-boot twin instead (disk-sdboot.img, payload-sdboot-V.ext4.zst, from
# the same Debian base): Debian's systemd-boot on the ESP, one Boot Loader Specification entry per slot
# (loader/entries, the kernel and initrd on the ESP) and the agent's bls backend.
# The Debian root filesystem comes from mmdebstrap with this machine's own apt sources and is cached by a key
# of its inputs (build/qemu/base-KEY.tar); the agent is installed on top on every build from its Debian package
# (make deb: build/deb/omaha-agent_VERSION_all.deb) with apt inside the tree, and the factory boot state is
# written by `omaha-agent provision` (run on the build host from the working tree: OMAHA_AGENT).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUT=${OUT:-$REPO/build/qemu}
SOURCES=${APT_SOURCES:-}
if [ -z "$SOURCES" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then SOURCES=$f; break; fi
  done
fi
[ -n "$SOURCES" ] || { echo "build-image: no apt sources found; set APT_SOURCES=FILE" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "build-image: needs root (mmdebstrap --mode=root, files owned by root)" >&2; exit 1; }

BOOTLOADER=${BOOTLOADER:-grub}
case "$BOOTLOADER" in
  grub) SUFFIX=; BOOT_CONFIG="{backend: grubenv, env: /boot/efi/grubenv, tries: 2}";;
  systemd-boot) SUFFIX=-sdboot; BOOT_CONFIG="{backend: bls, esp: /boot/efi, tries: 3}"
    SDBOOT_EFI=${SDBOOT_EFI:-/usr/lib/systemd/boot/efi/systemd-bootx64.efi}
    [ -s "$SDBOOT_EFI" ] || { echo "build-image: $SDBOOT_EFI missing: apt-get install systemd-boot-efi" >&2; exit 1; };;
  *) echo "build-image: BOOTLOADER must be grub or systemd-boot, not $BOOTLOADER" >&2; exit 1;;
esac
LAYOUT=${LAYOUT:-single}
case "$LAYOUT" in
  single) SLOTS_CONFIG="slots:
  a: {partlabel: ROOT-A}
  b: {partlabel: ROOT-B}";;
  groups) [ "$BOOTLOADER" = grub ] || { echo "build-image: LAYOUT=groups is a GRUB image" >&2; exit 1; }
    SUFFIX=-groups; SLOTS_CONFIG="slots:
  rootfs: {a: {partlabel: ROOT-A}, b: {partlabel: ROOT-B}, package: \"rootfs-*\"}
  kernel: {a: {partlabel: KERN-A}, b: {partlabel: KERN-B}, package: \"kernel-*\"}";;
  *) echo "build-image: LAYOUT must be single or groups, not $LAYOUT" >&2; exit 1;;
esac
INSTALL_CONFIG='install: {read_timeout: 30}'
# the groups twin also runs a post-install hook: it prints what it is given and which network it sees (the agent
# runs it as a transient unit of PID 1 with PrivateNetwork=yes: only lo; read from /proc/net/dev, the namespace
# the reader runs in, not /sys/class/net, which shows the one sysfs was mounted in)
[ "$LAYOUT" = single ] || INSTALL_CONFIG='install: {read_timeout: 30, post_install: ["echo hook version=$OMAHA_AGENT_VERSION rootfs=$OMAHA_AGENT_TARGET_ROOTFS kernel=$OMAHA_AGENT_TARGET_KERNEL net=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \" | paste -sd, -)"]}'
KERN_MIB=96
DEB=${DEB:-$(ls "$REPO"/build/deb/omaha-agent_*_all.deb 2>/dev/null | tail -n 1)}
[ -n "$DEB" ] && [ -s "$DEB" ] || { echo "build-image: no omaha-agent .deb: run make deb (make qemu-image does)" >&2; exit 1; }
OMAHA_AGENT=${OMAHA_AGENT:-$REPO/.venv/bin/omaha-agent}
[ -x "$OMAHA_AGENT" ] || { echo "build-image: $OMAHA_AGENT is missing: run make venv (make qemu-image does)" >&2; exit 1; }

PORT=${OMAHA_TEST_PORT:-18080}      # the dev server inside the test's network namespace (guest: 10.0.2.2)
APPID="{6f3c1a52-9c1e-4d9b-8a57-6d2f0c1e9a11}"
FS_SIZE=${FS_SIZE:-640M}           # each root filesystem; the partitions are larger (room to grow)
PART_MIB=${PART_MIB:-800}
ESP_MIB=64
STATE_MIB=32   # the agent's state lives outside the A/B pair: both slots must see the same trial record

PACKAGES=systemd-sysv,udev,kmod,initramfs-tools,linux-image-amd64,python3,python3-aiohttp,python3-yaml
PACKAGES=$PACKAGES,python3-defusedxml,python3-pyudev,python3-dbus-next,python3-zstandard,dbus,grub-common
PACKAGES=$PACKAGES,util-linux,e2fsprogs,python3-cryptography
# the agent's package installs offline on top of the cached base: every Python package it depends on or
# recommends must be in the base (a change here changes the cache key, so the base is built again)
for dep in $(dpkg-deb -f "$DEB" Depends Recommends | grep -o 'python3-[a-z0-9.+-]*' | sort -u); do
  case ",$PACKAGES," in *",$dep,"*) ;; *) echo "build-image: $(basename "$DEB") needs $dep: add it to PACKAGES" >&2; exit 1;; esac
done

# kernel modules a QEMU guest never loads; dropping them takes the root filesystem from ~750 to ~500 MB
PRUNE="sound drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/infiniband
drivers/staging drivers/bluetooth drivers/iio drivers/isdn drivers/scsi drivers/usb drivers/hid drivers/input
drivers/video drivers/mtd drivers/nfc drivers/net/can drivers/net/usb drivers/platform drivers/hwmon
drivers/misc drivers/md drivers/target drivers/thunderbolt drivers/edac net/wireless net/mac80211
net/bluetooth net/netfilter net/ipv4/netfilter net/ipv6/netfilter net/sched fs/btrfs fs/xfs fs/ocfs2
fs/nfs fs/nfsd fs/cifs fs/smb fs/gfs2 fs/f2fs fs/ceph fs/jfs fs/nilfs2 fs/ubifs fs/reiserfs"

mkdir -p "$OUT"
KEY=$( (echo "$PACKAGES"; echo "$PRUNE"; cat "$SOURCES"; echo v1) | sha256sum | cut -c1-16)
BASE=$OUT/base-$KEY.tar

if [ ! -s "$BASE" ]; then
  echo "build-image: building the Debian root filesystem (cache key $KEY)"
  hook='set -e; for k in "$1"/usr/lib/modules/*; do v=$(basename "$k"); for d in '"$(echo $PRUNE)"'; do
        rm -rf "$k/kernel/$d"; done; chroot "$1" depmod -a "$v"; done;
        rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*'
  mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook="$hook" \
    bookworm "$OUT/partial-$KEY.tar" "$SOURCES"
  mv "$OUT/partial-$KEY.tar" "$BASE"
  find "$OUT" -maxdepth 1 -name 'base-*.tar' ! -name "base-$KEY.tar" -delete
fi

WORK=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/root
mkdir "$TREE"
tar -C "$TREE" -xf "$BASE"

# ---- the agent from its Debian package (apt inside the tree: the postinst creates the group, enables the
# units), and a config for this image
cp "$DEB" "$TREE/tmp/omaha-agent.deb"
chroot "$TREE" sh -c 'cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./omaha-agent.deb' \
  >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; echo "build-image: apt could not install $DEB" >&2; exit 1; }
rm -rf "$TREE/tmp/omaha-agent.deb" "$TREE"/var/cache/apt/*.bin "$TREE/run/omaha-agent"
chroot "$TREE" dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\n' omaha-agent
cat > "$TREE/etc/omaha-agent/agent.yaml" <<EOF
server: {url: "http://10.0.2.2:$PORT/v1/update/", insecure_http: true, timeout: 20}
app: {id: "$APPID", track: stable, board: amd64-generic}
$SLOTS_CONFIG
boot: $BOOT_CONFIG
state_dir: /var/lib/omaha-agent
schedule: {initial_delay: 0, interval: 3600, backoff_base: 10, backoff_cap: 60}
reboot: {policy: immediate}
health: {commands: ["test -r /etc/os-release"], after: boot-complete, boot_complete_timeout: 300}
$INSTALL_CONFIG
trust: {require_signature: true, keys: [/etc/omaha-agent/keys/*.pem]}
EOF
# the release key: the image trusts its public half; the test's dev server signs the payloads with the private
# half (made once, kept beside the image, never inside it)
[ -s "$OUT/release-key.pem" ] || openssl genpkey -algorithm ed25519 -out "$OUT/release-key.pem" 2>/dev/null
openssl pkey -in "$OUT/release-key.pem" -pubout -out "$TREE/etc/omaha-agent/keys/release.pem"
mkdir -p "$TREE/boot/efi"
# / comes from root=PARTLABEL=ROOT-X (the kernel mounts it ro); this entry only makes systemd remount it rw
cat > "$TREE/etc/fstab" <<'EOF'
/dev/root        /                     ext4  rw,errors=remount-ro        0  0
PARTLABEL=ESP    /boot/efi             vfat  umask=0077,shortname=winnt  0  2
PARTLABEL=STATE  /var/lib/omaha-agent  ext4  rw,nodev,nosuid,noexec      0  2
EOF
echo omaha-qemu > "$TREE/etc/hostname"
mkdir -p "$TREE/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$TREE/etc/systemd/network/50-dhcp.network"
install -m 0755 "$HERE/guest/omaha-test-report" "$TREE/usr/local/bin/omaha-test-report"
install -m 0755 "$HERE/guest/omaha-test-watch" "$TREE/usr/local/bin/omaha-test-watch"
install -m 0644 "$HERE/guest/omaha-test-report.service" "$TREE/etc/systemd/system/omaha-test-report.service"
install -m 0755 "$HERE/guest/omaha-test-scenario" "$TREE/usr/local/bin/omaha-test-scenario"
install -m 0644 "$HERE/guest/omaha-test-scenario.service" "$TREE/etc/systemd/system/omaha-test-scenario.service"
systemctl --root="$TREE" enable systemd-networkd.service omaha-test-report.service omaha-test-scenario.service >/dev/null 2>&1
for unit in omaha-agent.service omaha-agent-confirm.service; do  # enabled by the package's postinst
  [ -L "$TREE/etc/systemd/system/multi-user.target.wants/$unit" ] || {
    echo "build-image: the package did not enable $unit" >&2; exit 1; }
done
systemctl --root="$TREE" mask apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service >/dev/null 2>&1 || true
# the kernel and initrd live in the slot: GRUB loads /vmlinuz and /initrd.img from the chosen partition
[ -e "$TREE/vmlinuz" ] && [ -e "$TREE/initrd.img" ] || { echo "build-image: no /vmlinuz in the tree" >&2; exit 1; }

os_release() {  # VERSION_ID is what the agent reports as its version
  rm -f "$TREE/etc/os-release"
  sed "/^VERSION_ID=/d" "$TREE/usr/lib/os-release" > "$TREE/etc/os-release"
  echo "VERSION_ID=$1" >> "$TREE/etc/os-release"
}
FS_UUID=5d1c0a7e-2b4f-4e8a-9c61-0e3b7f2a4d90
HASH_SEED=0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0
FAKE_TIME=1700000000
KERN_UUID=8a4e2c1d-6b3f-4d2a-9e5c-7f1b0a3d6c82
mkfs_root() {
  rm -f "$2"
  E2FSPROGS_FAKE_TIME=$FAKE_TIME SOURCE_DATE_EPOCH=$FAKE_TIME mkfs.ext4 -q -F -L rootfs -U "$FS_UUID" \
    -E root_owner=0:0,hash_seed=$HASH_SEED,nodiscard -d "$TREE" "$2" "$FS_SIZE"
}
chunk_root() {  # the adaptive release's files: NAME.cidx (the index) and NAME.czst (the payload)
  "$OMAHA_AGENT" chunk "$WORK/root-$1.ext4" -o "$OUT" --name "payload$SUFFIX-$1.ext4" --level 3
}

os_release 1.0.0
mkfs_root 1.0.0 "$WORK/root-1.0.0.ext4"
os_release 2.0.0
mkfs_root 2.0.0 "$WORK/root-2.0.0.ext4"
if [ "$BOOTLOADER" = grub ] && [ "$LAYOUT" = single ]; then   # (only the GRUB image's tests update adaptively)
  chunk_root 2.0.0
  # 2.1.0: a small release on top of 2.0.0 (a changed file, a new text file, a new binary asset)
  os_release 2.1.0
  printf 'omaha-qemu test image, release 2.1.0\n' > "$TREE/etc/motd"
  mkdir -p "$TREE/usr/share/omaha-test"
  seq -f 'release 2.1.0 note %g: the adaptive update fetches only the chunks 2.0.0 lacks' 1 1500 \
    > "$TREE/usr/share/omaha-test/notes-2.1.0.txt"
  head -c 393216 /dev/urandom > "$TREE/usr/share/omaha-test/asset-2.1.0.bin"
  mkfs_root 2.1.0 "$WORK/root-2.1.0.ext4"
  chunk_root 2.1.0
  rm -rf "$TREE/usr/share/omaha-test" "$TREE/etc/motd"
fi
os_release 3.0.0
rm -f "$TREE/sbin/init" "$TREE/usr/sbin/init"
printf '#!/bin/sh\necho "omaha-test: version 3.0.0 has a broken init" >&2\nexit 1\n' > "$TREE/usr/sbin/init"
chmod 0755 "$TREE/usr/sbin/init"
mkfs_root 3.0.0 "$WORK/root-3.0.0.ext4"
if [ "$LAYOUT" = groups ]; then
  # each release's kernel partition: the kernel and initrd, and kern.cfg naming the release (GRUB sources it)
  mkfs_kern() {
    rm -rf "$WORK/kern" && mkdir "$WORK/kern"
    cp "$(readlink -f "$TREE/vmlinuz")" "$WORK/kern/vmlinuz"
    cp "$(readlink -f "$TREE/initrd.img")" "$WORK/kern/initrd.img"
    printf 'set kern_version=%s\n' "$1" > "$WORK/kern/kern.cfg"
    rm -f "$2"
    E2FSPROGS_FAKE_TIME=$FAKE_TIME mkfs.ext2 -q -F -L kernel -U "$KERN_UUID" -E root_owner=0:0,hash_seed=$HASH_SEED \
      -d "$WORK/kern" "$2" 80M
  }
  mkdir -p "$OUT/groups"
  mkfs_kern 1.0.0 "$WORK/kern-1.0.0.ext2"
  mkfs_kern 2.0.0 "$WORK/kern-2.0.0.ext2"
  zstd -q -f -T0 -3 "$WORK/root-2.0.0.ext4" -o "$OUT/groups/rootfs-2.0.0.ext4.zst"
  zstd -q -f -T0 -3 "$WORK/kern-2.0.0.ext2" -o "$OUT/groups/kernel-2.0.0.img.zst"
else
  zstd -q -f -T0 -3 "$WORK/root-2.0.0.ext4" -o "$OUT/payload$SUFFIX-2.0.0.ext4.zst"
  zstd -q -f -T0 -3 "$WORK/root-3.0.0.ext4" -o "$OUT/payload$SUFFIX-3.0.0.ext4.zst"
fi

mkfs.vfat -n ESP -C "$WORK/esp.img" $((ESP_MIB * 1024)) >/dev/null
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
if [ "$BOOTLOADER" = systemd-boot ]; then
# ---- the ESP: systemd-boot, no menu and no default entry (the entries' names decide: agent/boot/bls.py), the
# kernel and initrd shared by both slots, one entry per slot in the factory state the agent's provisioning writes
mkdir -p "$WORK/esp/loader/entries"
printf 'timeout 0\neditor no\n' > "$WORK/esp/loader/loader.conf"
for slot in A B; do
  printf 'title Omaha slot %s\nlinux /omaha/vmlinuz\ninitrd /omaha/initrd.img\noptions root=PARTLABEL=ROOT-%s ro console=ttyS0 panic=5 omaha_agent.slot=%s\n' \
    "$slot" "$slot" "$slot" > "$WORK/esp/loader/entries/omaha-$(echo $slot | tr AB ab).conf"
done
mkdir -p "$WORK/sdroot/boot" && ln -s "$WORK/esp" "$WORK/sdroot/boot/efi"   # the tree as the config sees it (boot.esp)
"$OMAHA_AGENT" provision --config "$TREE/etc/omaha-agent/agent.yaml" --slot a --version 1.0.0 --image-root "$WORK/sdroot"
# (omaha-1-a.conf good, omaha-0-b+0.conf bad: the factory state)
mmd -i "$WORK/esp.img" ::/loader ::/loader/entries ::/omaha
mcopy -i "$WORK/esp.img" "$SDBOOT_EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$WORK/esp.img" "$WORK/esp/loader/loader.conf" ::/loader/loader.conf
mcopy -i "$WORK/esp.img" "$WORK/esp/loader/entries/"*.conf ::/loader/entries/
mcopy -i "$WORK/esp.img" "$(readlink -f "$TREE/vmlinuz")" ::/omaha/vmlinuz
mcopy -i "$WORK/esp.img" "$(readlink -f "$TREE/initrd.img")" ::/omaha/initrd.img
else

# ---- the ESP: a standalone GRUB whose embedded stub hands over to the project's grub.cfg beside the grubenv
cat > "$WORK/stub.cfg" <<'EOF'
search --no-floppy --set=esp --file /omaha-agent-esp
set prefix=($esp)/
configfile ($esp)/grub.cfg
EOF
grub-mkstandalone -O x86_64-efi -o "$WORK/BOOTX64.EFI" \
  --modules="part_gpt fat ext2 search search_fs_file loadenv test echo linux configfile normal" \
  --locales= --themes= --fonts= "boot/grub/grub.cfg=$WORK/stub.cfg"
# the factory state (A good with 1.0.0, B bad, nothing armed) in the grubenv the image's config names
# (boot.env: /boot/efi/grubenv), inside a directory standing for the ESP's mount
mkdir -p "$WORK/esp/boot/efi"
"$OMAHA_AGENT" provision --config "$TREE/etc/omaha-agent/agent.yaml" --slot a --version 1.0.0 --image-root "$WORK/esp"
mcopy -i "$WORK/esp.img" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
if [ "$LAYOUT" = groups ]; then  # the package's fragment, the kernel taken from the slot's KERN partition
  sed -e 's|^set B_PART=gpt3$|&\nset A_KERN=gpt5\nset B_KERN=gpt6|' \
      -e 's|^menuentry |if [ "${boot_slot}" = "A" ]; then set kern="(${ROOT_DISK},${A_KERN})"; fi\nif [ "${boot_slot}" = "B" ]; then set kern="(${ROOT_DISK},${B_KERN})"; fi\nset kern_version=none\nsource ${kern}/kern.cfg\n\n&|' \
      -e 's|^  linux /vmlinuz \(.*\)$|  linux ${kern}/vmlinuz \1 omaha_test.kern=${kern_version}|' \
      -e 's|^  initrd /initrd.img$|  initrd ${kern}/initrd.img|' \
      "$TREE/usr/share/omaha-agent/grub.cfg" > "$WORK/grub.cfg"
  grep -q 'omaha_test.kern' "$WORK/grub.cfg" && grep -q 'B_KERN=gpt6' "$WORK/grub.cfg" || {
    echo "build-image: the GRUB fragment changed: LAYOUT=groups cannot point it at the KERN partitions" >&2; exit 1; }
  mcopy -i "$WORK/esp.img" "$WORK/grub.cfg" ::/grub.cfg
else
  mcopy -i "$WORK/esp.img" "$TREE/usr/share/omaha-agent/grub.cfg" ::/grub.cfg   # the package's fragment
fi
mcopy -i "$WORK/esp.img" "$WORK/esp/boot/efi/grubenv" ::/grubenv
: > "$WORK/marker" && mcopy -i "$WORK/esp.img" "$WORK/marker" ::/omaha-agent-esp
fi

# ---- the disk
DISK=$OUT/disk$SUFFIX.img
rm -f "$DISK"
KERNS=0; [ "$LAYOUT" = single ] || KERNS=2
truncate -s $(( (1 + ESP_MIB + 2 * PART_MIB + STATE_MIB + KERNS * KERN_MIB + 1) * 1024 * 1024 )) "$DISK"
{
  printf 'label: gpt\nstart=1MiB, size=%sMiB, type=uefi, name=ESP\n' "$ESP_MIB"
  printf 'size=%sMiB, type=linux, name=ROOT-A\nsize=%sMiB, type=linux, name=ROOT-B\n' "$PART_MIB" "$PART_MIB"
  printf 'size=%sMiB, type=linux, name=STATE\n' "$STATE_MIB"
  [ "$KERNS" = 0 ] || printf 'size=%sMiB, type=linux, name=KERN-A\nsize=%sMiB, type=linux, name=KERN-B\n' \
    "$KERN_MIB" "$KERN_MIB"
} | sfdisk -q "$DISK"
dd if="$WORK/esp.img" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root-1.0.0.ext4" of="$DISK" bs=1M seek=$((1 + ESP_MIB)) conv=notrunc,sparse status=none
mkfs.ext4 -q -F -L state "$WORK/state.ext4" ${STATE_MIB}M
dd if="$WORK/state.ext4" of="$DISK" bs=1M seek=$((1 + ESP_MIB + 2 * PART_MIB)) conv=notrunc,sparse status=none
[ "$KERNS" = 0 ] || dd if="$WORK/kern-1.0.0.ext2" of="$DISK" bs=1M seek=$((1 + ESP_MIB + 2 * PART_MIB + STATE_MIB)) \
  conv=notrunc,sparse status=none
echo "$APPID" > "$OUT/appid"
echo "$PORT" > "$OUT/port"
if [ "$LAYOUT" = groups ]; then ls -l "$DISK" "$OUT"/groups/*.zst; else ls -l "$DISK" "$OUT"/payload$SUFFIX-*.zst; fi
[ "$BOOTLOADER" != grub ] || [ "$LAYOUT" != single ] || ls -l "$OUT"/payload-2.[01].0.ext4.c*
echo "build-image: done"
