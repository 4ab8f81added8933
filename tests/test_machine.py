"""The state machine as pure code: every (operation, command) pair has a typed answer, and the table in the
module's docstring and in the README is the one the code answers with."""
import os
import re

import pytest

from agent import machine
from agent.machine import (
    Act, Action, Apply, Cancel, Check, ConfirmBoot, Flow, HealthTimeout, InstallFile, MarkGood, NoOp, OfferDeclined, OfferTaken,
    Operation, PostponeReboot, Reboot, Refuse, Reset, Rollback, RollbackTarget, Settle, decide, may_install,
    rollback_target,
)

from .simdevice import ROOT

COLUMNS = {"check": Check(True), "cancel": Cancel(), "mark-good": MarkGood(), "reset": Reset(), "reboot": Reboot(),
           "confirm": ConfirmBoot(), "install": InstallFile("/media/usb/image.img"), "postpone": PostponeReboot(600),
           "rollback": Rollback(), "apply": Apply()}
EVERY_COMMAND = list(COLUMNS.values()) + [Settle(), HealthTimeout(900)]


def kind(cell: str) -> type:
    cell = cell.strip().strip("*").lower()
    if cell.startswith("act"):
        return Act
    if cell.startswith("no-op"):
        return NoOp
    if cell.startswith("refuse"):
        return Refuse
    raise AssertionError(f"a table cell that says neither act, no-op nor refuse: {cell!r}")


def table_rows(lines):
    """(operations, {column: cell}) for each row of a table whose header names the command columns."""
    header = None
    for line in lines:
        cells = [c for c in re.split(r"\s{2,}|\s*\|\s*", line.strip()) if c and not set(c) <= set("=-:")]
        if not cells:
            continue
        if "check" in cells and "reboot" in cells:
            header = [c.rstrip("¹²³⁴⁵⁶⁷⁸⁹⁰") for c in cells[1:]]
            continue
        if header and len(cells) == len(header) + 1:
            ops = [Operation(o.strip().strip("`")) for o in cells[0].split(",")]
            yield ops, dict(zip(header, cells[1:]))


def check_table(rows) -> int:
    seen = 0
    for ops, row in rows:
        for op in ops:
            for column, command in COLUMNS.items():
                got = decide(op, command, "2.0.0")
                assert isinstance(got, kind(row[column])), (op.value, column, row[column], got)
                seen += 1
    return seen


def test_every_pair_gets_a_typed_answer_and_none_raises():
    for op in Operation:
        for command in EVERY_COMMAND:
            assert isinstance(decide(op, command, "2.0.0"), (Act, NoOp, Refuse)), (op, command)


def test_the_docstring_table_is_what_decide_answers():
    seen = check_table(table_rows(machine.__doc__.splitlines()))
    assert seen == len(Operation) * len(COLUMNS)  # every operation appears in a row


def test_the_readme_table_is_what_decide_answers():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## The state machine"):]
    section = section[:section.index("\n## ", 5)]
    assert check_table(table_rows(section.splitlines())) == len(Operation) * len(COLUMNS)


@pytest.mark.parametrize("op", [Operation.CHECKING, Operation.DOWNLOADING, Operation.VERIFYING,
                                Operation.FINALIZING, Operation.NEED_REBOOT])
def test_mark_good_never_acts_while_an_update_runs_or_waits_for_its_reboot(op):
    assert isinstance(decide(op, MarkGood(), "2.0.0"), NoOp)


def test_mark_good_during_the_health_step_is_refused_and_confirm_boot_is_a_no_op():
    assert isinstance(decide(Operation.HEALTH_CHECK, MarkGood()), Refuse)
    assert isinstance(decide(Operation.HEALTH_CHECK, ConfirmBoot()), NoOp)
    assert decide(Operation.AWAITING_BOOT_COMPLETE, MarkGood()) == Act(Action.CONFIRM_TRIAL)
    assert decide(Operation.AWAITING_BOOT_COMPLETE, HealthTimeout(5)) == Act(Action.FAIL_TRIAL)
    assert isinstance(decide(Operation.IDLE, HealthTimeout(5)), NoOp)


def test_only_the_first_settle_acts_and_nothing_else_runs_before_it():
    assert decide(Operation.STARTING, Settle()) == Act(Action.SETTLE)
    for op in set(Operation) - {Operation.STARTING}:
        assert isinstance(decide(op, Settle()), NoOp)
    for command in COLUMNS.values():
        assert isinstance(decide(Operation.STARTING, command), Refuse)


def test_a_second_check_while_one_runs_is_a_no_op_not_a_second_job():
    assert decide(Operation.IDLE, Check()) == Act(Action.START_UPDATE_JOB)
    for op in machine.UPDATE_JOB:
        assert isinstance(decide(op, Check()), NoOp)



@pytest.mark.parametrize("op", [Operation.STAGED, Operation.NEED_REBOOT, Operation.REBOOT_PENDING])
def test_checks_go_on_while_an_update_waits(op):
    """issue 27 row 2: a waiting update (staged, or armed for its reboot) no longer stops checks (before: a no-op,
    so a device rebooted into the waiting version, then downloaded the newer one and rebooted again)."""
    assert decide(op, Check(), "2.0.0") == Act(Action.START_UPDATE_JOB)
    assert machine.Operation.CHECKING in machine.TRANSITIONS[op]


def test_a_transition_the_table_does_not_have_raises():
    seen = []
    flow = Flow(lambda old, new: seen.append(new.value))
    for op in (Operation.IDLE, Operation.CHECKING, Operation.UPDATE_AVAILABLE, Operation.DOWNLOADING,
               Operation.REPORTING_ERROR, Operation.IDLE):
        flow.to(op)
    assert seen == ["idle", "checking", "update-available", "downloading", "reporting-error", "idle"]
    flow.to(Operation.CHECKING)
    flow.to(Operation.NEED_REBOOT)  # a check that found the armed update again
    with pytest.raises(RuntimeError, match="cannot go from updated-need-reboot to downloading"):
        flow.to(Operation.DOWNLOADING)
    assert flow.operation is Operation.NEED_REBOOT
    flow.to(Operation.CHECKING)  # a check while it waits (issue 27 row 2)
    flow.to(Operation.UPDATE_AVAILABLE)
    flow.to(Operation.STAGED)  # declined, or staged (install.arm: on-apply)
    with pytest.raises(RuntimeError, match="cannot go from staged to finalizing"):
        flow.to(Operation.FINALIZING)


def test_install_policy_answers_with_types():
    common = dict(trial_version=None, blocked_version=None, blocked_until=0.0, rollback_allowed=False,
                  booted_good=True, now=100.0)
    assert isinstance(may_install("2.0.0", "1.0.0", **common), OfferTaken)
    assert "already running" in may_install("1.0", "1.0.0.0", **common).reason
    assert "downgrade" in may_install("0.9.0", "1.0.0", **common).reason
    assert isinstance(may_install("0.9.0", "1.0.0", **dict(common, rollback_allowed=True)), OfferTaken)
    assert "not confirmed good" in may_install("2.0.0", "1.0.0", **dict(common, booted_good=False)).reason
    assert "waits for a reboot" in may_install("2.0.0", "1.0.0", **dict(common, trial_version="2.0.0")).reason
    blocked = dict(common, blocked_version="2.0.0", blocked_until=200.0)
    assert isinstance(may_install("2.0.0", "1.0.0", **blocked), OfferDeclined)
    # issue 27 row 2: a waiting update is replaced only by a newer one; the same again is no re-download
    assert isinstance(may_install("2.1.0", "1.0.0", **dict(common, trial_version="2.0.0")), OfferTaken)
    assert isinstance(may_install("2.1.0", "1.0.0", **dict(common, staged_version="2.0.0")), OfferTaken)
    assert "already staged" in may_install("2.0", "1.0.0", **dict(common, staged_version="2.0.0")).reason
    assert "not newer than 2.0.0" in may_install("1.5.0", "1.0.0", **dict(common, trial_version="2.0.0")).reason
    assert "not newer than 2.0.0" in may_install("1.5.0", "1.0.0", **dict(common, staged_version="2.0.0")).reason
    assert "a rollback to 0.9.0 waits" in may_install("2.1.0", "1.0.0", **dict(common, trial_version="0.9.0",
                                                                                waiting_rollback=True)).reason
    assert isinstance(may_install("2.0.0", "1.0.0", **dict(blocked, now=201.0)), OfferTaken)


MARK_GOOD_NEEDS_A_GOOD_SLOT = {Operation.IDLE} | machine.UPDATE_JOB  # footnotes 1 and 2


@pytest.mark.parametrize("booted_good", [True, False])
def test_the_table_holds_whether_the_running_slot_is_good_or_not(booted_good):
    """issue 24 row 9: the table with the bootloader's word both ways; when the running slot is not good (or cannot
    be read) only mark-good in idle and while an update job runs changes (refused), never while an update waits
    for its reboot (before: refused there too, against the table's no-op)."""
    for ops, row in table_rows(machine.__doc__.splitlines()):
        for op in ops:
            for column, command in COLUMNS.items():
                got = decide(op, command, "2.0.0", booted_good)
                if not booted_good and column == "mark-good" and op in MARK_GOOD_NEEDS_A_GOOD_SLOT:
                    assert got.kind == "NotConfirmable", (op, got)
                elif not booted_good and column == "rollback" and op is Operation.IDLE:
                    assert got.kind == "NoRollback" and "goes back to the other slot already" in got.reason, got
                else:
                    assert isinstance(got, kind(row[column])), (op.value, column, booted_good, got)
    for op in machine.WAITING_FOR_REBOOT:
        assert "already good" in decide(op, MarkGood(), "2.0.0", booted_good=False).reason


def test_a_rollback_acts_only_when_idle_and_says_why_it_is_refused_elsewhere():
    """issue 29 row 4: the rollback column: idle arms it; a job running or a trial boot is Busy; an installed update
    waiting for its reboot holds the other slot, so there is nothing older to go back to."""
    assert decide(Operation.IDLE, Rollback()) == Act(Action.ROLL_BACK)
    for op in machine.UPDATE_JOB | {Operation.HEALTH_CHECK, Operation.AWAITING_BOOT_COMPLETE}:
        got = decide(op, Rollback(), "2.0.0")
        assert isinstance(got, Refuse) and got.kind == "Busy", (op, got)
    for op in machine.WAITING_FOR_REBOOT:
        got = decide(op, Rollback(), "2.0.0")
        assert got.kind == "NoRollback" and "version 2.0.0 is installed and waits for a reboot" in got.reason
    assert Operation.NEED_REBOOT in machine.TRANSITIONS[Operation.IDLE]  # the armed rollback waits for its reboot


@pytest.mark.parametrize("args, reason", [
    ((None, "", "", None, "2.0.0", None), "cannot tell which slot runs"),
    (("b", "good", "good", "1.0.0", "2.0.0", "3.0.0"), "version 3.0.0 is armed on slot a"),
    (("b", "bad", "good", "1.0.0", "2.0.0", None), "the running slot b is not good (bad)"),
    (("b", "good", "bad", "1.0.0", "2.0.0", None), "slot a is bad or empty"),
    (("b", "good", "trial", "1.0.0", "2.0.0", None), "slot a holds an update that never booted to confirmation"),
    (("b", "good", "good", None, "2.0.0", None), "slot a is good but its version is unknown"),
    (("b", "good", "good", "2.0", "2.0.0", None), "slot a holds 2.0, the version running"),
])
def test_a_rollback_target_is_refused_with_its_reason(args, reason):
    got = rollback_target(*args)
    assert isinstance(got, Refuse) and got.kind == "NoRollback" and reason in got.reason, got
    assert "\n" not in got.reason


def test_a_good_other_slot_of_known_version_is_the_rollback_target():
    assert rollback_target("b", "good", "good", "1.0.0", "2.0.0", None) == RollbackTarget("a", "1.0.0")
    assert rollback_target("a", "good", "good", "2.0.0", "1.0.0", None) == RollbackTarget("b", "2.0.0")  # forward


def test_a_version_rolled_back_from_is_declined_for_its_block_and_says_so():
    common = dict(trial_version=None, blocked_version="2.0.0", blocked_until=200.0, rollback_allowed=False,
                  booted_good=True, now=100.0, blocked_rolled_back=True)
    assert "was rolled back on this device" in may_install("2.0.0", "1.0.0", **common).reason
    assert isinstance(may_install("2.0.1", "1.0.0", **common), OfferTaken)  # a newer one is not blocked
    assert isinstance(may_install("2.0.0", "1.0.0", **dict(common, now=201.0)), OfferTaken)


@pytest.mark.parametrize("booted_good", [True, False])
def test_the_flatcar_methods_answer_the_table_and_a_refusal_is_a_dbus_error(booted_good):
    """issue 24 row 10: AttemptUpdate and ResetStatus are the table's check and reset; a refusal is a D-Bus error
    with the project's error name, an act or a no-op (a check already runs) is none (before: AttemptUpdate threw
    the reply away, so a refusal in starting, awaiting-boot-complete or health-check returned success)."""
    from agent.dbus import flatcar
    from agent.owner import Reply
    for op in Operation:
        for member, command in flatcar.COMMANDS.items():
            decision = decide(op, command, "2.0.0", booted_good)
            error = flatcar.error_for(Reply(decision, getattr(decision, "reason", "")))
            if isinstance(decision, Refuse):
                assert error == (f"org.omaha_agent.Agent1.Error.{decision.kind}", decision.reason), (op, member)
            else:
                assert error is None, (op, member, decision)
    for op in (Operation.STARTING, Operation.AWAITING_BOOT_COMPLETE, Operation.HEALTH_CHECK):
        assert isinstance(decide(op, flatcar.COMMANDS["AttemptUpdate"]), Refuse)
    assert flatcar.error_for(Reply(flatcar_failed(), "disk gone")) == ("org.omaha_agent.Agent1.Error.Failed",
                                                                      "disk gone")


def flatcar_failed():
    from agent.owner import Failed
    return Failed("disk gone")


def test_apply_arms_only_a_staged_update_and_says_why_elsewhere():
    """issue 27 row 1: the apply column: staged arms it; an update that waits for its reboot needs nothing; idle
    has nothing staged; a job running is Busy; a trial boot has nothing staged."""
    assert decide(Operation.STAGED, Apply(), "2.0.0") == Act(Action.APPLY)
    for op in machine.WAITING_FOR_REBOOT:
        assert "waits for its reboot already" in decide(op, Apply(), "2.0.0").reason
    assert decide(Operation.IDLE, Apply()).kind == "NothingToApply"
    for op in machine.UPDATE_JOB:
        assert decide(op, Apply()).kind == "Busy"
    for op in machine.TRIAL_BOOT:
        assert decide(op, Apply()).kind == "NothingToApply"
    assert decide(Operation.STARTING, Apply()).kind == "Starting"


def test_a_staged_update_is_neither_rebooted_into_nor_rolled_back_over():
    assert decide(Operation.STAGED, Reboot(), "2.0.0").kind == "NothingToReboot"
    assert "apply it" in decide(Operation.STAGED, Reboot(), "2.0.0").reason
    assert decide(Operation.STAGED, Rollback(), "2.0.0").kind == "NoRollback"
    assert decide(Operation.STAGED, Cancel(), "2.0.0").kind == "NothingToCancel"
    assert decide(Operation.STAGED, PostponeReboot(60), "2.0.0").kind == "NothingToPostpone"
    assert isinstance(decide(Operation.STAGED, Reset(), "2.0.0"), NoOp)
    assert decide(Operation.STAGED, InstallFile("/media/x.img"), "2.0.0") == Act(Action.START_INSTALL_JOB)
