# omaha-agent A/B selection for U-Boot (the `uboot` backend's counterpart).
# Make boot.scr from it:  mkimage -A arm64 -T script -C none -n "omaha-agent A/B" -d boot.cmd boot.scr
# and put boot.scr on the boot partition, where U-Boot's distro boot finds it.
#
# The env, per slot X in A and B, as omaha-agent writes it with fw_setenv:
#   BOOT_ORDER   boot preference, e.g. "B A"
#   BOOT_X_OK    1 = confirmed good (the agent marks it after the health step)
#   BOOT_X_LEFT  trial attempts left while BOOT_X_OK is not 1 (the agent sets it after a verified install)
# A good slot boots as is: its attempts are not counted and the env is not written. A trial slot loses one
# attempt *before* it boots, saved first, so a kernel that never comes up runs out of attempts and the next
# slot in BOOT_ORDER boots. Attempts are decimal, 1 to 15; "0", empty or anything else is none left.
#
# The env lives in two files on the boot partition (FAT), libubootenv's redundant pair: each file is
# CRC32 (4 bytes, little-endian), a flags byte, then the variables ("name=value" NUL-separated) up to the
# size. The copy with a good CRC and the newer flags (serial order: 255 -> 0 wraps) is current; a write goes
# to the other copy with the current flags + 1, so a write torn by a power cut leaves the current copy as it
# was. Linux uses the same files through /etc/fw_env.config (config/uboot/fw_env.config):
#   /boot/firmware/uboot.env         0x0000  0x4000
#   /boot/firmware/uboot-redund.env  0x0000  0x4000
# This script writes back the A/B variables only (the list in `env export` below).
#
# Needs: load, fatwrite, env import/export, setexpr, test, cp, mw (U-Boot 2023.01 has them all).
# Adjust the layout below to the device: the partitions of the slots, the kernel command line, the
# scratch memory (four 1 MiB areas of free RAM, clear of the kernel and initrd load addresses).

if test -z "${devtype}"; then setenv devtype virtio; fi
if test -z "${devnum}"; then setenv devnum 0; fi
setenv omaha_env_part ${distro_bootpart}
if test -z "${omaha_env_part}"; then setenv omaha_env_part 1; fi
setenv omaha_a_part 2
setenv omaha_b_part 3
setenv omaha_args "ro console=ttyAMA0 panic=5"
setenv omaha_env_file1 uboot.env
setenv omaha_env_file2 uboot-redund.env
setenv omaha_env_size 4000
setenv omaha_env1 50000000
setenv omaha_env2 50100000
setenv omaha_out 50200000
setenv omaha_crc 50300000

# ---- read the two copies: the flags of each one that loads
setenv omaha_f1
setenv omaha_f2
setexpr omaha_isize ${omaha_env_size} - 1
if load ${devtype} ${devnum}:${omaha_env_part} ${omaha_env1} ${omaha_env_file1} ${omaha_env_size}; then
  setexpr omaha_a ${omaha_env1} + 4
  setexpr.b omaha_f1 *${omaha_a}
fi
if load ${devtype} ${devnum}:${omaha_env_part} ${omaha_env2} ${omaha_env_file2} ${omaha_env_size}; then
  setexpr omaha_a ${omaha_env2} + 4
  setexpr.b omaha_f2 *${omaha_a}
fi
# the newer first: copy 2 when (f2 - f1) mod 256 is 1 to 127
setenv omaha_order "1 2"
if test -n "${omaha_f1}" -a -n "${omaha_f2}"; then
  setexpr omaha_d ${omaha_f2} - ${omaha_f1}
  setexpr omaha_d ${omaha_d} % 100
  if test "${omaha_d}" != "0"; then
    setexpr omaha_d ${omaha_d} / 80
    if test "${omaha_d}" = "0"; then setenv omaha_order "2 1"; fi
  fi
fi
# import the newer copy if its CRC is good, else the other one (env import -c checks the CRC before it
# imports anything; it wants the CRC right before the variables, so the CRC moves over the flags byte)
setenv omaha_cur
for c in ${omaha_order}; do
  if test -z "${omaha_cur}"; then
    setenv omaha_addr ${omaha_env1}
    setenv omaha_f ${omaha_f1}
    if test "${c}" = "2"; then setenv omaha_addr ${omaha_env2}; setenv omaha_f ${omaha_f2}; fi
    if test -n "${omaha_f}"; then
      setexpr omaha_a ${omaha_addr} + 1
      cp.b ${omaha_addr} ${omaha_crc} 4
      cp.b ${omaha_crc} ${omaha_a} 4
      if env import -c ${omaha_a} ${omaha_isize}; then
        setenv omaha_cur ${c}
        setenv omaha_flags ${omaha_f}
      else
        echo "omaha-agent: env copy ${c} has a bad CRC"
      fi
    fi
  fi
done

# ---- choose the slot
if test -z "${BOOT_ORDER}"; then setenv BOOT_ORDER "A B"; fi
setenv omaha_slot
setenv omaha_save 0
for s in ${BOOT_ORDER}; do
  if test -z "${omaha_slot}"; then
    setenv omaha_ok
    setenv omaha_left
    if test "${s}" = "A"; then setenv omaha_ok "${BOOT_A_OK}"; setenv omaha_left "${BOOT_A_LEFT}"; fi
    if test "${s}" = "B"; then setenv omaha_ok "${BOOT_B_OK}"; setenv omaha_left "${BOOT_B_LEFT}"; fi
    if test "${omaha_ok}" = "1"; then
      setenv omaha_slot ${s}
    else
      # the attempts left after this one, by lookup (setexpr counts in hex and 0 - 1 wraps)
      setenv omaha_next
      setenv omaha_prev
      for n in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
        if test "${n}" = "${omaha_left}"; then setenv omaha_next "${omaha_prev}"; fi
        setenv omaha_prev ${n}
      done
      if test -n "${omaha_next}"; then
        if test "${s}" = "A"; then setenv BOOT_A_LEFT ${omaha_next}; fi
        if test "${s}" = "B"; then setenv BOOT_B_LEFT ${omaha_next}; fi
        setenv omaha_slot ${s}
        setenv omaha_save 1
      fi
    fi
  fi
done

# ---- a trial: save its countdown into the copy that is not current before booting it
if test "${omaha_save}" = "1"; then
  if test "${omaha_cur}" = "1"; then setenv omaha_file ${omaha_env_file2}; else setenv omaha_file ${omaha_env_file1}; fi
  setexpr omaha_flags ${omaha_flags} + 1
  setexpr omaha_flags ${omaha_flags} % 100
  mw.b ${omaha_out} 0 ${omaha_env_size}
  setexpr omaha_a ${omaha_out} + 1
  env export -c -s ${omaha_isize} ${omaha_a} BOOT_ORDER BOOT_A_OK BOOT_A_LEFT BOOT_B_OK BOOT_B_LEFT
  cp.b ${omaha_a} ${omaha_crc} 4
  cp.b ${omaha_crc} ${omaha_out} 4
  setexpr omaha_a ${omaha_out} + 4
  mw.b ${omaha_a} ${omaha_flags}
  if fatwrite ${devtype} ${devnum}:${omaha_env_part} ${omaha_out} ${omaha_file} ${omaha_env_size}; then
    echo "omaha-agent: slot ${omaha_slot} trial, ${omaha_next} attempt(s) left after this one (${omaha_file})"
  else
    # an uncounted trial could boot forever: boot the first good slot instead
    echo "omaha-agent: could not save the env; not trying slot ${omaha_slot}"
    setenv omaha_slot
    for s in ${BOOT_ORDER}; do
      if test -z "${omaha_slot}"; then
        if test "${s}" = "A" -a "${BOOT_A_OK}" = "1"; then setenv omaha_slot A; fi
        if test "${s}" = "B" -a "${BOOT_B_OK}" = "1"; then setenv omaha_slot B; fi
      fi
    done
  fi
fi

# ---- boot it (nothing bootable by the rules should not happen: the agent never marks the running slot bad;
# boot A rather than nothing)
if test "${omaha_slot}" = "B"; then setenv omaha_part ${omaha_b_part}; else setenv omaha_slot A; setenv omaha_part ${omaha_a_part}; fi
echo "omaha-agent: booting slot ${omaha_slot} (partition ${omaha_part})"
setenv bootargs "root=PARTLABEL=ROOT-${omaha_slot} ${omaha_args} omaha_agent.slot=${omaha_slot}"
if load ${devtype} ${devnum}:${omaha_part} ${kernel_addr_r} /vmlinuz; then
  if load ${devtype} ${devnum}:${omaha_part} ${ramdisk_addr_r} /initrd.img; then
    booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdt_addr}
  fi
fi
# the slot did not boot: reset, so a trial's next attempt (or the fallback) follows
echo "omaha-agent: slot ${omaha_slot} did not boot; resetting"
reset
