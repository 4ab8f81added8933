"""U-Boot environment backend through ``fw_printenv``/``fw_setenv`` (libubootenv or u-boot-tools).

Variables, RAUC-compatible, plus one for the confirmation: ``BOOT_ORDER`` (e.g. ``B A``),
``BOOT_X_LEFT`` (attempts left) and ``BOOT_X_OK`` (1 = confirmed good). State: ``BOOT_X_OK=1`` → good;
attempts left → trial; else bad. The project's boot script (config/uboot/boot.cmd) boots the first good slot
in ``BOOT_ORDER`` as is, or the first trial after counting one attempt down. A RAUC-style script counts a good
slot's attempts down too, so they are refilled to ``GOOD_ATTEMPTS`` when the agent confirms a slot
(``mark_good``) and on every start while the booted slot is good (``refill``, as RAUC's mark-good service
does at each boot); without that a confirmed slot would stop booting after ``GOOD_ATTEMPTS`` reboots. A trial
slot's attempts are never refilled: that is its countdown. Every change is one ``fw_setenv -s`` call, so a
redundant environment (two copies in fw_env.config) switches in a single write to the copy that is not current.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

from . import BootError, SlotState, SlotStatus, check_slot, check_tries, other, reorder

GOOD_ATTEMPTS = 3


class UBootBoot:
    name = "uboot"

    def __init__(self, config: str | None = None, printenv: str = "fw_printenv", setenv: str = "fw_setenv"):
        self.config = config
        self.printenv = printenv
        self.setenv = setenv

    def _cmd(self, tool: str) -> list[str]:
        return [tool] + (["-c", self.config] if self.config else [])

    def _run(self, args: list[str], what: str) -> str:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise BootError(f"{args[0]} not found: install libubootenv-tool (or u-boot-tools)") from None
        except subprocess.TimeoutExpired:
            raise BootError(f"{args[0]} did not finish in 30 s while {what}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise BootError(f"{args[0]} failed while {what}: {detail[-1] if detail else 'exit ' + str(proc.returncode)}")
        return proc.stdout

    def _env(self) -> dict[str, str]:
        out = self._run(self._cmd(self.printenv), "reading the U-Boot environment")
        env = {}
        for line in out.splitlines():
            name, eq, value = line.partition("=")
            if eq:
                env[name] = value
        return env

    def _set(self, values: dict[str, str], defaults: str | None = None) -> None:
        fd, script = tempfile.mkstemp(prefix="omaha-agent-uboot.", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{k}={v}\n" for k, v in values.items()))
            args = self._cmd(self.setenv) + (["-f", defaults] if defaults else []) + ["-s", script]
            self._run(args, "writing the U-Boot environment")
        finally:
            os.unlink(script)

    def initialize(self, good: str = "a", defaults: str | None = None) -> None:
        """The factory state: ``good`` good with full attempts, the other slot bad, nothing armed. No write when
        the env holds it already (a redundant pair would otherwise switch copies: the same state, other bytes).
        A blank env (no valid copy) starts from ``defaults``, else from the factory variables alone."""
        g, o = check_slot(good).upper(), other(good).upper()
        values = {"BOOT_ORDER": f"{g} {o}", f"BOOT_{g}_LEFT": str(GOOD_ATTEMPTS), f"BOOT_{g}_OK": "1",
                  f"BOOT_{o}_LEFT": "0", f"BOOT_{o}_OK": "0"}
        try:
            env = self._env()
        except BootError:  # blank or unreadable: fw_setenv starts from the defaults
            env = {}
        if all(env.get(name) == value for name, value in values.items()):
            return
        if defaults is not None:
            self._set(values, defaults)
            return
        fd, factory = tempfile.mkstemp(prefix="omaha-agent-uboot-defaults.", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{k}={v}\n" for k, v in values.items()))
            self._set(values, factory)
        finally:
            os.unlink(factory)

    def status(self) -> dict[str, SlotStatus]:
        env = self._env()
        out = {}
        for slot in ("a", "b"):
            x = slot.upper()
            left = env.get(f"BOOT_{x}_LEFT", "0").strip()
            left_n = int(left) if left.isdigit() else 0
            if env.get(f"BOOT_{x}_OK", "0").strip() == "1":
                out[slot] = SlotStatus(SlotState.GOOD)
            elif left_n > 0:
                out[slot] = SlotStatus(SlotState.TRIAL, left_n)
            else:
                out[slot] = SlotStatus(SlotState.BAD)
        return out

    def refill(self, slot: str) -> bool:
        """Refills the attempts of ``slot`` if it is good (``BOOT_X_OK=1``) and the boot script has counted them
        down; one ``fw_setenv`` call, none when they are full. True when it wrote."""
        x = check_slot(slot).upper()
        env = self._env()
        if env.get(f"BOOT_{x}_OK", "0").strip() != "1" or env.get(f"BOOT_{x}_LEFT", "").strip() == str(GOOD_ATTEMPTS):
            return False
        self._set({f"BOOT_{x}_LEFT": str(GOOD_ATTEMPTS)})
        return True

    def mark_bad(self, slot: str) -> None:
        x = check_slot(slot).upper()
        env = self._env()
        self._set({f"BOOT_{x}_LEFT": "0", f"BOOT_{x}_OK": "0", "BOOT_ORDER": reorder(env.get("BOOT_ORDER", "A B"), last=slot)})

    def set_trial(self, slot: str, tries: int, version: str | None = None) -> None:
        x = check_slot(slot).upper()
        check_tries(tries, 15)
        env = self._env()
        self._set({f"BOOT_{x}_OK": "0", f"BOOT_{x}_LEFT": str(tries), "BOOT_ORDER": reorder(env.get("BOOT_ORDER", "A B"), first=slot)})

    def mark_good(self, slot: str) -> None:
        x = check_slot(slot).upper()
        env = self._env()
        self._set({f"BOOT_{x}_OK": "1", f"BOOT_{x}_LEFT": str(GOOD_ATTEMPTS),
                   "BOOT_ORDER": reorder(env.get("BOOT_ORDER", "A B"), first=slot)})
