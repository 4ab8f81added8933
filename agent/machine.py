"""The update state machine, without I/O: operations, the commands that reach the owner, and the decision for
every (operation, command) pair.

Every entry point (the schedule, the start-up settle, each D-Bus method, the CLI) becomes a ``Command`` handed
to the one owner (``owner.py``), which asks ``decide`` and acts on the answer: ``Act`` (do it), ``NoOp`` (nothing
to do; the reason is the answer) or ``Refuse`` (the caller gets an error with the reason). A command never has
a side effect the table does not name.

Operations: ``starting`` (before the start-up settle), ``idle``, ``checking``, ``update-available``,
``downloading``, ``verifying``, ``finalizing`` (the update job), ``reporting-error`` (a job reporting its
failure), ``staged`` (an update written and verified, its signature checked, but not armed: ``install.arm`` is
``on-apply`` or ``in-window``; a reboot boots the running slot again), ``updated-need-reboot`` (an armed trial waits for a reboot nobody planned: the manual policy, or one
already asked of logind), ``reboot-pending`` (the reboot job: a planned reboot waits for its time, a maintenance
window, a shutdown inhibitor or the fleet's lock, then reboots), ``awaiting-boot-complete`` (the trial
slot booted; its health step waits for boot-complete.target), ``health-check`` (the health step runs).

================================  ============  ==============  =============  ==============  =============  ========  ========  =========  ==========  ===========
operation \\ command              check         cancel          mark-good      reset           reboot         confirm   install⁶  postpone   rollback⁹   apply¹⁰
================================  ============  ==============  =============  ==============  =============  ========  ========  =========  ==========  ===========
starting                          refuse        refuse          refuse         refuse          refuse         refuse    refuse    refuse     refuse      refuse
idle                              ACT job       refuse          no-op¹         no-op           refuse         no-op     ACT job   refuse     ACT arm⁹    refuse
checking                          no-op         ACT cancel      no-op²         refuse          refuse         no-op     refuse    refuse     refuse      refuse
update-available                  ACT hurry¹²   ACT cancel      no-op²         refuse          refuse         no-op     refuse    refuse     refuse      refuse
downloading                       no-op         ACT cancel      no-op²         refuse          refuse         no-op     refuse    refuse     refuse      refuse
verifying, finalizing             no-op         refuse          no-op²         refuse          refuse         no-op     refuse    refuse     refuse      refuse
reporting-error                   no-op         refuse          no-op²         refuse          refuse         no-op     refuse    refuse     refuse      refuse
staged                            ACT job¹¹     refuse          no-op          no-op           refuse         no-op     ACT job   refuse     refuse      ACT arm¹⁰
updated-need-reboot               ACT job¹¹     refuse          no-op          ACT → idle³     ACT reboot⁷    no-op     refuse    refuse⁸    refuse      no-op
reboot-pending                    ACT job¹¹     refuse          no-op          ACT → idle³     ACT reboot⁷    no-op     refuse    ACT⁸       refuse      no-op
awaiting-boot-complete            refuse        refuse          ACT trial⁴     refuse          refuse         ACT job   refuse    refuse     refuse      refuse
health-check                      refuse        refuse          refuse⁵        refuse          refuse         no-op     refuse    refuse     refuse      refuse
================================  ============  ==============  =============  ==============  =============  ========  ========  =========  ==========  ===========

The start-up ``settle`` is acted on in ``starting`` only (a no-op anywhere else); ``health-timeout`` (boot-complete
never came) is acted on in ``awaiting-boot-complete`` only. A job's end is no command: the owner learns it from
the job's task and moves the operation through ``TRANSITIONS`` (``owner.py`` says which operation follows).

1. The running slot is good, so there is nothing to confirm; refused when it is not (its update failed here and
   was reported so, or the bootloader could not be read): marking it good would contradict the report.
2. As in idle: a no-op when the running slot is good, refused when it is not (a check also runs on a slot whose
   update failed here, under the manual reboot policy; it installs nothing there).
3. Flatcar's ``ResetStatus``: the installed update stays armed and still boots on the next reboot; a later
   install onto that slot first drops its trial record.
4. An external health check replaces the wait for boot-complete.target: the trial slot is marked good, 3/2.
5. The running health step decides; a second, concurrent verdict would report the trial twice.
6. An offline install (a payload file and its signature envelope) runs the update job from the file; anywhere
   else it is refused, not queued: the caller asked for that file now.
7. An operator's reboot: now, without waiting for a window, the notice or a shutdown inhibitor; the fleet's lock
   (FleetLock) is still taken first when one is configured. In ``reboot-pending`` it replaces the plan.
8. ``PostponeReboot`` moves a planned reboot later, at most ``reboot.max_postpone`` past its first planned time
   (refused once that bound is reached); with nothing planned (the manual policy) there is nothing to move.
9. An operator's rollback: the other slot's older system is armed for a trial boot (its own settle, health step
   and 3/2 follow the reboot), and the reboot is planned by ``reboot.policy`` as for an installed update
   (``updated-need-reboot``, then ``reboot-pending`` unless the policy is manual). Acting reads the bootloader
   first, and ``rollback_target`` can still refuse: the running slot not good, the other slot bad, empty, on
   trial or of unknown version, or a trial record already armed. Refused while a job runs, while an installed
   update waits for its reboot (it holds the other slot now) and during a trial boot (it is confirmed first).
10. ``Apply`` arms the staged update (its slot is hashed again first when the device booted since it was staged:
   bytes that no longer match the signed digest are refused and the staged update is dropped) and plans the reboot
   by ``reboot.policy``, as an installed update's. Where an update already waits for its reboot it is a no-op
   (armed already, or armed just before the planned reboot under ``install.arm: in-window``).
11. Checks go on while an update waits (staged, or armed for its reboot): a newer offer is installed over the
   waiting one on the same slot (it is disarmed first, so one reboot reaches the newest and the one replaced is not
   reported as failed); the same version again is a no-op. A planned reboot keeps its time across the check. The
   check is refused (``Busy``) once the reboot is being asked for.
12. An interactive check (D-Bus, the CLI) while the update job has an offer in hand: the job goes on as an
   interactive one (its download is capped by ``install.max_rate_interactive``; a wait for an unmetered connection
   ends and the download starts now). A check from the schedule is a no-op there, as in ``checking``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .omaha import versions


class Operation(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    CHECKING = "checking"
    UPDATE_AVAILABLE = "update-available"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    FINALIZING = "finalizing"
    NEED_REBOOT = "updated-need-reboot"
    REBOOT_PENDING = "reboot-pending"
    REPORTING_ERROR = "reporting-error"
    STAGED = "staged"
    AWAITING_BOOT_COMPLETE = "awaiting-boot-complete"
    HEALTH_CHECK = "health-check"


_O = Operation
UPDATE_JOB = frozenset({_O.CHECKING, _O.UPDATE_AVAILABLE, _O.DOWNLOADING, _O.VERIFYING, _O.FINALIZING,
                        _O.REPORTING_ERROR})
JOB = UPDATE_JOB | {_O.HEALTH_CHECK, _O.REBOOT_PENDING}
WAITING_FOR_REBOOT = frozenset({_O.NEED_REBOOT, _O.REBOOT_PENDING})
WAITING = WAITING_FOR_REBOOT | {_O.STAGED}  # an update waits: checks go on, a newer offer replaces it
TRIAL_BOOT = frozenset({_O.AWAITING_BOOT_COMPLETE, _O.HEALTH_CHECK})

TRANSITIONS: dict[Operation, frozenset[Operation]] = {
    _O.STARTING: frozenset({_O.IDLE, _O.NEED_REBOOT, _O.AWAITING_BOOT_COMPLETE, _O.HEALTH_CHECK, _O.STAGED}),
    _O.IDLE: frozenset({_O.CHECKING, _O.NEED_REBOOT}),  # a check, or an operator's rollback armed
    _O.CHECKING: frozenset({_O.IDLE, _O.UPDATE_AVAILABLE, _O.REPORTING_ERROR, _O.NEED_REBOOT, _O.STAGED}),
    _O.UPDATE_AVAILABLE: frozenset({_O.DOWNLOADING, _O.IDLE, _O.REPORTING_ERROR, _O.NEED_REBOOT, _O.STAGED}),
    _O.DOWNLOADING: frozenset({_O.VERIFYING, _O.REPORTING_ERROR, _O.IDLE}),
    _O.VERIFYING: frozenset({_O.FINALIZING, _O.REPORTING_ERROR, _O.IDLE, _O.DOWNLOADING}),
    _O.FINALIZING: frozenset({_O.NEED_REBOOT, _O.REPORTING_ERROR, _O.STAGED}),
    _O.STAGED: frozenset({_O.CHECKING, _O.NEED_REBOOT, _O.REBOOT_PENDING, _O.IDLE}),  # a check, Apply, the window
    _O.NEED_REBOOT: frozenset({_O.IDLE, _O.REBOOT_PENDING, _O.CHECKING}),
    _O.REBOOT_PENDING: frozenset({_O.IDLE, _O.NEED_REBOOT, _O.CHECKING, _O.STAGED}),
    _O.REPORTING_ERROR: frozenset({_O.IDLE, _O.NEED_REBOOT, _O.STAGED}),
    _O.AWAITING_BOOT_COMPLETE: frozenset({_O.HEALTH_CHECK, _O.IDLE}),
    _O.HEALTH_CHECK: frozenset({_O.IDLE, _O.REPORTING_ERROR, _O.AWAITING_BOOT_COMPLETE}),
}


class Flow:
    """The current operation; refuses transitions the machine does not have."""

    def __init__(self, on_change=None):
        self.operation = Operation.STARTING
        self.on_change = on_change

    def to(self, operation: Operation) -> None:
        if operation == self.operation:
            return
        if operation not in TRANSITIONS[self.operation]:
            raise RuntimeError(f"flow cannot go from {self.operation.value} to {operation.value}")
        old, self.operation = self.operation, operation
        if self.on_change:
            self.on_change(old, operation)


# ---------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Check:
    interactive: bool = False


@dataclass(frozen=True)
class InstallFile:
    """An offline install: a payload file, its DSSE envelope ("" = the payload's path + ".sig"), and the version
    (used only when signatures are not required and no envelope says it)."""

    path: str
    signature: str = ""
    version: str = ""


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class MarkGood:
    pass


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class Reboot:
    pass


@dataclass(frozen=True)
class ConfirmBoot:
    pass


@dataclass(frozen=True)
class PostponeReboot:
    seconds: int


@dataclass(frozen=True)
class Rollback:
    """An operator's rollback to the older system on the other slot."""


@dataclass(frozen=True)
class Apply:
    """Arm the staged update and plan its reboot."""


@dataclass(frozen=True)
class Settle:
    pass


@dataclass(frozen=True)
class HealthTimeout:
    seconds: float


Command = (Check | InstallFile | Cancel | MarkGood | Reset | Reboot | ConfirmBoot | PostponeReboot | Rollback | Settle
           | HealthTimeout | Apply)


# ---------------------------------------------------------------------------------------------- decisions
class Action(str, Enum):
    START_UPDATE_JOB = "start the update job"
    START_INSTALL_JOB = "start the update job from a file"
    CANCEL_JOB = "cancel the running job"
    CONFIRM_TRIAL = "mark the trial slot good and report 3/2"
    START_HEALTH_JOB = "run the health step"
    FAIL_TRIAL = "fail the trial: mark it bad, report 3/0, reboot back"
    RESET = "back to idle; the armed update stays armed"
    REBOOT = "reboot into the installed update now"
    POSTPONE_REBOOT = "move the planned reboot later"
    SETTLE = "settle the last update"
    ROLL_BACK = "arm the other slot's older system for a trial boot"
    APPLY = "arm the staged update and plan its reboot"
    HURRY_JOB = "the running update job goes on as an interactive one"


@dataclass(frozen=True)
class Act:
    action: Action


@dataclass(frozen=True)
class NoOp:
    reason: str


@dataclass(frozen=True)
class Refuse:
    reason: str
    kind: str = "Failed"  # the D-Bus error name's last part


Decision = Act | NoOp | Refuse


def decide(operation: Operation, command: Command, new_version: str = "", booted_good: bool = True) -> Decision:
    """The answer to ``command`` in ``operation``: the table in this module's docstring. ``booted_good`` (the
    bootloader's word on the running slot) matters to mark-good while idle or while an update job runs."""
    op = operation
    if isinstance(command, Settle):
        return Act(Action.SETTLE) if op is _O.STARTING else NoOp("the last update is settled already")
    if op is _O.STARTING:
        return Refuse("the agent is starting; try again in a moment", "Starting")
    if isinstance(command, HealthTimeout):
        return Act(Action.FAIL_TRIAL) if op is _O.AWAITING_BOOT_COMPLETE else NoOp("no trial boot waits")
    waiting = f"version {new_version} is installed and waits for a reboot"
    trial = "the running slot boots on trial"
    staged = f"version {new_version} is staged (not armed): apply it to boot it (omaha-agent apply)"
    if op is _O.STAGED:
        return _staged(command, staged)
    if isinstance(command, Apply):
        return _apply(op, new_version)
    if isinstance(command, Check):
        if op is _O.IDLE or op in WAITING_FOR_REBOOT:
            return Act(Action.START_UPDATE_JOB)
        if op is _O.UPDATE_AVAILABLE and command.interactive:
            return Act(Action.HURRY_JOB)
        if op in UPDATE_JOB:
            return NoOp(f"a check is already running ({op.value})")
        return Refuse(f"{trial}: no update check before it is confirmed ({op.value})", "Busy")
    if isinstance(command, InstallFile):
        if op is _O.IDLE:
            return Act(Action.START_INSTALL_JOB)
        if op in UPDATE_JOB:
            return Refuse(f"an update is already running ({op.value}); try again when it ends", "Busy")
        if op in WAITING_FOR_REBOOT:
            return Refuse(f"{waiting}; reboot first (or reset to replace it)", "Busy")
        return Refuse(f"{trial}: no install before it is confirmed ({op.value})", "Busy")
    if isinstance(command, Cancel):
        if op in (_O.CHECKING, _O.UPDATE_AVAILABLE, _O.DOWNLOADING):
            return Act(Action.CANCEL_JOB)
        if op in (_O.VERIFYING, _O.FINALIZING):
            return Refuse(f"the update is {op.value}; that step cannot be interrupted", "Busy")
        if op in WAITING_FOR_REBOOT:
            return Refuse(f"no download is running: {waiting} (PostponeReboot moves a planned reboot)",
                          "NothingToCancel")
        return Refuse(f"no download is running (the agent is {op.value})", "NothingToCancel")
    if isinstance(command, MarkGood):
        if op is _O.IDLE:
            if booted_good:
                return NoOp("the running slot is already good")
            return Refuse("the running slot is not good: its update failed here (and was reported so) or its state "
                          "cannot be read; reboot to go back to the other slot", "NotConfirmable")
        if op is _O.AWAITING_BOOT_COMPLETE:
            return Act(Action.CONFIRM_TRIAL)
        if op is _O.HEALTH_CHECK:
            return Refuse("the health check of the running trial is in progress; its result decides", "Busy")
        if op in WAITING_FOR_REBOOT:  # an update was installed from here: only a good slot installs one
            return NoOp(f"the running slot is already good; {waiting}")
        if not booted_good:
            return Refuse("the running slot is not good: its update failed here (and was reported so) or its state "
                          "cannot be read; reboot to go back to the other slot", "NotConfirmable")
        return NoOp("the running slot is already good")
    if isinstance(command, Reset):
        if op in WAITING_FOR_REBOOT:
            return Act(Action.RESET)
        if op is _O.IDLE:
            return NoOp("idle")
        return Refuse(f"cannot reset while {op.value}", "Busy")
    if isinstance(command, Reboot):
        if op in WAITING_FOR_REBOOT:
            return Act(Action.REBOOT)
        return Refuse(f"no update waits for a reboot (the agent is {op.value})", "NothingToReboot")
    if isinstance(command, PostponeReboot):
        if op is _O.REBOOT_PENDING:
            return Act(Action.POSTPONE_REBOOT)
        if op is _O.NEED_REBOOT:
            return Refuse(f"no reboot is planned to postpone: {waiting} (reboot.policy is manual, or the reboot "
                          "was already asked for)", "NothingToPostpone")
        return Refuse(f"no reboot is planned (the agent is {op.value})", "NothingToPostpone")
    if isinstance(command, ConfirmBoot):
        if op is _O.AWAITING_BOOT_COMPLETE:
            return Act(Action.START_HEALTH_JOB)
        if op is _O.HEALTH_CHECK:
            return NoOp("the health check of the running trial is in progress")
        return NoOp("no trial boot waits for confirmation")
    if isinstance(command, Rollback):
        return _rollback(op, waiting, booted_good)
    raise TypeError(f"not a command: {command!r}")


def _staged(command: Command, staged: str) -> Decision:
    """The ``staged`` row: the running slot is good (only a good one installs), the other holds the staged update."""
    if isinstance(command, (Check, InstallFile, Apply)):
        return Act({Check: Action.START_UPDATE_JOB, InstallFile: Action.START_INSTALL_JOB,
                    Apply: Action.APPLY}[type(command)])
    if isinstance(command, MarkGood):
        return NoOp(f"the running slot is already good; {staged}")
    if isinstance(command, Reset):
        return NoOp(f"{staged}; it stays staged (a newer offer replaces it)")
    if isinstance(command, ConfirmBoot):
        return NoOp("no trial boot waits for confirmation")
    if isinstance(command, Cancel):
        return Refuse(f"no download is running: {staged}", "NothingToCancel")
    if isinstance(command, Reboot):
        return Refuse(f"nothing is armed to reboot into: {staged}", "NothingToReboot")
    if isinstance(command, PostponeReboot):
        return Refuse(f"no reboot is planned: {staged}", "NothingToPostpone")
    if isinstance(command, Rollback):
        return Refuse(f"{staged.partition(':')[0]} on the other slot: nothing older is left there to roll back to",
                      "NoRollback")
    raise TypeError(f"not a command: {command!r}")


def _apply(op: Operation, new_version: str) -> Decision:
    if op in WAITING_FOR_REBOOT:
        return NoOp(f"version {new_version} waits for its reboot already (armed, or armed just before the planned "
                    "reboot under install.arm: in-window)")
    if op is _O.IDLE:
        return Refuse("no update is staged: nothing to apply (a check stages one under install.arm: on-apply)",
                      "NothingToApply")
    if op in UPDATE_JOB:
        return Refuse(f"an update is running ({op.value}); apply once it is staged", "Busy")
    return Refuse(f"the running slot boots on trial ({op.value}): nothing is staged", "NothingToApply")


def _rollback(op: Operation, waiting: str, booted_good: bool) -> Decision:
    if op is _O.IDLE:
        if not booted_good:
            return Refuse("the running slot is not good (its update failed here, or its state cannot be read): the "
                          "next reboot goes back to the other slot already", "NoRollback")
        return Act(Action.ROLL_BACK)
    if op in WAITING_FOR_REBOOT:
        return Refuse(f"{waiting} on the other slot: nothing older is left there to roll back to", "NoRollback")
    if op in TRIAL_BOOT:
        return Refuse(f"the running slot boots on trial ({op.value}): it is confirmed or failed first; roll back "
                      "once it is good", "Busy")
    return Refuse(f"an update is running ({op.value}); roll back once it ends", "Busy")


@dataclass(frozen=True)
class RollbackTarget:
    """The slot a rollback arms, and the version it holds."""

    slot: str
    version: str


def rollback_target(booted: str | None, booted_state: str, other_state: str, other_version: str | None,
                    current: str, armed: str | None) -> RollbackTarget | Refuse:
    """Whether the other slot can be rolled back to, from the bootloader's fresh word (the slot states ``good``,
    ``trial``, ``bad``), the version the other slot is known to hold (None: unknown), the running version and
    the version of a trial record (None: no record)."""
    if booted is None:
        return Refuse("cannot tell which slot runs: nothing is rolled back", "NoRollback")
    other = "b" if booted == "a" else "a"
    if armed is not None:
        return Refuse(f"version {armed} is armed on slot {other} and waits for a reboot: nothing older is left "
                      "there to roll back to", "NoRollback")
    if booted_state != "good":
        return Refuse(f"the running slot {booted} is not good ({booted_state}): the next reboot goes back to slot "
                      f"{other} already", "NoRollback")
    if other_state == "trial":
        return Refuse(f"slot {other} holds an update that never booted to confirmation: nothing to roll back to",
                      "NoRollback")
    if other_state != "good":
        return Refuse(f"slot {other} is bad or empty (never installed, or its update failed): nothing to roll back "
                      "to", "NoRollback")
    if not other_version:
        return Refuse(f"slot {other} is good but its version is unknown (no update installed by this agent was "
                      "confirmed over it): it is not booted blind", "NoRollback")
    if versions.same(other_version, current):
        return Refuse(f"slot {other} holds {other_version}, the version running: nothing to roll back to",
                      "NoRollback")
    return RollbackTarget(other, other_version)


# ---------------------------------------------------------------------------------------------- install policy
@dataclass(frozen=True)
class OfferTaken:
    """The install policy takes the offer (``reason`` says which update it is)."""

    reason: str


@dataclass(frozen=True)
class OfferDeclined:
    """The install policy declines the offer; ``reason`` says why."""

    reason: str


def may_install(offer: str, current: str, *, trial_version: str | None, blocked_version: str | None,
                blocked_until: float, rollback_allowed: bool, booted_good: bool,
                now: float, blocked_rolled_back: bool = False, staged_version: str | None = None,
                waiting_rollback: bool = False) -> OfferTaken | OfferDeclined:
    """Whether an offered version is installed. Never relies on the server to compare versions. An update that
    waits (``trial_version`` armed for its reboot, or ``staged_version``) is replaced only by a newer one."""
    if not booted_good:
        return OfferDeclined("the running slot is not confirmed good yet; no update before it is")
    if versions.same(offer, current):
        return OfferDeclined(f"version {offer} is already running")
    if trial_version is not None and waiting_rollback:
        return OfferDeclined(f"a rollback to {trial_version} waits for its reboot; no update before it is settled")
    if trial_version is not None and versions.same(offer, trial_version):
        return OfferDeclined(f"version {offer} is already installed and waits for a reboot")
    if staged_version is not None and versions.same(offer, staged_version):
        return OfferDeclined(f"version {offer} is already staged")
    waiting = trial_version if trial_version is not None else staged_version
    if waiting is not None and not versions.is_newer(offer, waiting):
        return OfferDeclined(f"version {offer} is not newer than {waiting}, which waits already")
    if blocked_version is not None and versions.same(offer, blocked_version) and now < blocked_until:
        if blocked_rolled_back:
            return OfferDeclined(f"version {offer} was rolled back on this device; not offered again before the "
                                 "block ends")
        return OfferDeclined(f"version {offer} failed on this device; not retried before the backoff ends")
    if not versions.is_newer(offer, current) and not rollback_allowed:
        return OfferDeclined(f"version {offer} is older than {current}: a downgrade, refused "
                       "(set app.rollback_allowed to accept)")
    return OfferTaken(f"update {current} -> {offer}")
