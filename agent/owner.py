"""The one owner of every transition: commands from every entry point are executed here, one at a time, in the
order they arrive; ``machine.decide`` answers each (act, no-op or refuse) and only an ``Act`` has an effect.

Long work runs as the owner's one job (the update job, the health step of a trial boot, the reboot job): a task
the owner starts and can cancel. The job protocol:

* a job reports progress (checking → update-available → downloading → verifying → finalizing, reporting-error)
  with ``advance``, which the owner applies through the machine's transitions: one the table does not have is a
  bug, and it fails the job loudly;
* a job never says that it ended: its task's done callback queues the end (a result, a failure or a
  cancellation), and a command that comes first handles it first, so a command never sees a job that has ended
  as running;
* ``_after`` says which operation follows a job's end, and ``_end_job`` applies it (a failed job passes through
  reporting-error when the table has that step) and saves.

Faults are contained: an exception in a command or a job (a bootloader, disk or network error, or a bug) fails
that command or job with a one-line reason in ``LastError`` and the journal; the owner goes on. Saves go through
``Context.save``: a failed one is logged and shown, and never stops a safety step or an answer.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from . import rollback, staged
from .boot import BootError
from .errors import AttemptFailed, CommandFailed, Refused, describe
from .machine import (
    TRANSITIONS, UPDATE_JOB, Act, Action, Cancel, Command, Decision, HealthTimeout, NoOp, Operation, Refuse, decide,
)
from .reboot import Rebooter
from .settle import Found
from .slots import SlotError

log = logging.getLogger("omaha-agent")

__all__ = ["CommandFailed", "Failed", "Outcome", "Owner", "Reply", "describe"]

STOPPING = "the agent is stopping"


@dataclass(frozen=True)
class Failed:
    """An ``Act`` whose execution failed; ``reason`` is the one line a user sees."""

    reason: str


@dataclass(frozen=True)
class Outcome:
    """How a job ended (a cancelled job's task ends cancelled instead)."""

    ok: bool
    message: str


@dataclass(frozen=True)
class Reply:
    result: Act | NoOp | Refuse | Failed
    message: str
    job: asyncio.Task | None = None  # the job the command started: its Outcome, or cancelled (Owner.finished)

    @property
    def acted(self) -> bool:
        return isinstance(self.result, Act)


@dataclass(frozen=True)
class _Ended:
    """The owner's own queue item: a job's task is done."""

    task: asyncio.Task


class _Barrier:
    """The owner's own queue item: answered once everything queued before it is handled."""


def _stopping() -> Reply:
    return Reply(Refuse(STOPPING, "Stopping"), STOPPING)


class Owner:
    def __init__(self, ctx, settler, attempt, *, wait_for_boot_complete: bool = False, rebooter=None):
        self.ctx = ctx
        self.settler = settler
        self.attempt = attempt
        self.reporter = attempt.reporter
        self.rebooter = rebooter or Rebooter(ctx, self.reporter.http)
        self.rebooter.before_reboot = self._arm_in_window
        self.wait_for_boot_complete = wait_for_boot_complete
        self.once = False  # a one-shot run: the reboot job does not wait (for a window, a lock, an inhibitor)
        self.job: asyncio.Task | None = None
        self._what = ""  # the running job: "check", "install", "health step" or "reboot"
        self.job_ended = asyncio.Event()  # set whenever a job ends (the schedule plans the next check then)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None
        self._closing = False

    @property
    def flow(self):
        return self.ctx.status.flow

    # -------------------------------------------------------------- the queue
    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, command: Command) -> Reply:
        """Hands ``command`` to the owner and waits for its answer (not for a job it starts: see ``Reply.job``)."""
        if self._closing or self._runner is None or self._runner.done():
            return _stopping()
        answer = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((command, answer))
        return await asyncio.shield(answer)

    async def finished(self, job: asyncio.Task) -> Outcome | None:
        """Waits for ``job`` and for the owner to have applied its end; its ``Outcome`` (None: cancelled)."""
        await asyncio.wait({job})
        if not self._closing and self._runner is not None and not self._runner.done():
            await self.submit(_Barrier())
        return None if job.cancelled() else job.result()

    async def _run(self) -> None:
        while True:
            command, answer = await self._queue.get()
            try:
                if isinstance(command, _Ended):
                    await self._end_job(command.task)
                    continue
                reply = None if isinstance(command, _Barrier) else await self._handle(command)
            except asyncio.CancelledError:
                if answer is not None and not answer.done():
                    answer.set_result(_stopping())
                raise
            except BaseException as exc:  # _handle contains everything; this is the last line of defence
                log.exception("command %s failed", type(command).__name__)
                reply = Reply(Failed(describe(exc)), describe(exc))
            if answer is not None and not answer.done():
                answer.set_result(reply)

    async def _handle(self, command: Command) -> Reply:
        ended = await self._end_job(self.job) if self.job is not None and self.job.done() else None
        operation = self.flow.operation
        name = type(command).__name__
        if isinstance(command, Cancel) and ended in UPDATE_JOB:
            reason = f"nothing to cancel: the {ended.value} job had already ended"
            log.info("%s in %s: no-op (%s)", name, operation.value, reason)
            return Reply(NoOp(reason), reason)
        decision: Decision = decide(operation, command, self.ctx.status.new_version, self.ctx.status.booted_good)
        if not isinstance(decision, Act):
            log.info("%s in %s: %s (%s)", name, operation.value, type(decision).__name__.lower(), decision.reason)
            return Reply(decision, decision.reason)
        try:
            message, job = await self._act(decision.action, command)
            return Reply(decision, message, job)
        except Refused as exc:  # what only acting could tell (a postponement past its bound)
            log.info("%s in %s: refuse (%s)", name, operation.value, exc.refuse.reason)
            return Reply(exc.refuse, exc.refuse.reason)
        except Exception as exc:
            reason = describe(exc)
            if not isinstance(exc, (BootError, SlotError, OSError, CommandFailed)):
                log.exception("%s failed unexpectedly", name)
            log.error("%s: %s", name, reason)
            self.ctx.state.last_error = reason
            await self.ctx.save()
            return Reply(Failed(reason), reason)

    # -------------------------------------------------------------- actions
    async def _act(self, action: Action, command: Command) -> tuple[str, asyncio.Task | None]:
        ctx, status = self.ctx, self.ctx.status
        if action is Action.SETTLE:
            return await self._settle()
        if action is Action.START_UPDATE_JOB:
            await self._pause_reboot_job()
            self.flow.to(Operation.CHECKING)
            return "checking for an update", self._start_job(self.attempt.run(command.interactive, self.advance),
                                                             "check")
        if action is Action.START_INSTALL_JOB:
            self.flow.to(Operation.CHECKING)
            job = self.attempt.run_file(command.path, command.signature, command.version, self.advance)
            return f"installing {command.path}", self._start_job(job, "install")
        if action is Action.HURRY_JOB:
            return self.attempt.hurry(), None
        if action is Action.CANCEL_JOB:  # the job runs: a done one was ended before deciding
            if self.job is None:
                raise AssertionError(f"{self.flow.operation.value} without a job")
            if self.job.cancelling():
                return "already cancelling", None
            self.job.cancel()
            if self.flow.operation is Operation.DOWNLOADING:
                return "download cancelled; it resumes from its checkpoint on the next check", None
            return f"{self.flow.operation.value} cancelled", None
        if action is Action.CONFIRM_TRIAL:
            if ctx.state.trial is None or ctx.state.trial.slot != ctx.booted:
                raise CommandFailed("no trial record names the running slot; restart the agent to settle it")
            await self.settler.confirm(ctx.state.trial)
            self._stop_timer()
            ctx.spawn(self.reporter.flush(), "sending the 3/2")  # the caller does not wait for the server
            self.flow.to(Operation.IDLE)
            self.rebooter.release_when_steady()
            return f"slot {ctx.booted} marked good", None
        if action is Action.START_HEALTH_JOB:
            self._stop_timer()
            self.flow.to(Operation.HEALTH_CHECK)
            return (f"boot complete: checking the health of slot {ctx.booted}",
                    self._start_job(self._health_job(None), "health step"))
        if action is Action.FAIL_TRIAL:
            self.flow.to(Operation.HEALTH_CHECK)
            failure = f"boot-complete.target was not reached within {command.seconds:g} s"
            return failure, self._start_job(self._health_job(failure), "health step")
        if action is Action.RESET:
            self.rebooter.refuse_once_asked()
            if self.rebooter.drop():
                await ctx.save("the dropped postponement")  # before the caller hears it
            if self.flow.operation is Operation.REBOOT_PENDING and self.job is not None:
                self.job.cancel()  # its end finds no plan: idle
                return f"the planned reboot is dropped; version {status.new_version} stays installed", None
            self.flow.to(Operation.IDLE)
            status.clear_offer()
            return "idle", None
        if action is Action.REBOOT:
            return self._plan_reboot(forced=True)
        if action is Action.ROLL_BACK:
            trial = await rollback.arm(ctx)
            status.offer(trial.version, 0)  # named in the operation's change
            return self._armed(f"rollback to {trial.version} armed on slot {trial.slot}")
        if action is Action.APPLY:
            try:
                trial = await staged.arm(ctx, self.reporter)
            except staged.StagedRefused:
                self.flow.to(Operation.IDLE)
                status.clear_offer()
                raise
            return self._armed(f"{trial.version} armed on slot {trial.slot}")
        if action is Action.POSTPONE_REBOOT:
            message = self.rebooter.postpone(command.seconds)
            await ctx.save("the postponement")  # on disk before the caller hears it: a restart keeps it
            return message, None
        raise AssertionError(f"no execution for {action}")

    async def _settle(self) -> tuple[str, asyncio.Task | None]:
        ctx = self.ctx
        try:
            found = await self.settler.settle()
        except Exception as exc:
            self.flow.to(Operation.IDLE)  # the daemon goes on; the next start settles again
            raise CommandFailed(f"start-up could not settle the last update: {describe(exc)}") from None
        if ctx.state.staged is not None and (found is not Found.NOTHING or ctx.state.trial is not None
                                             or ctx.state.staged.slot == ctx.booted):
            ctx.state.staged = None  # armed since (a stop during Apply), or it is what runs now
            await ctx.save("the end of the staged record")
        if found is Found.NOTHING and ctx.state.staged is not None and ctx.booted is not None:
            self.flow.to(Operation.STAGED)
            return self._staged_waits()
        if found is not Found.WAITING and ctx.state.postponed is not None:
            ctx.state.postponed = None  # the reboot it postponed came (or the update is gone)
            await ctx.save("the end of the postponement")
        if found is Found.WAITING:
            self.flow.to(Operation.NEED_REBOOT)
            if ctx.config.reboot.policy != "manual":
                return self._plan_reboot(forced=False)
            return f"version {ctx.status.new_version} is installed and waits for a reboot", None
        if found is Found.TRIAL_BOOT and self.wait_for_boot_complete:
            self.flow.to(Operation.AWAITING_BOOT_COMPLETE)
            self._start_timer()
            log.info("slot %s boots on trial: its health check runs once boot-complete.target is reached", ctx.booted)
            return f"slot {ctx.booted} boots on trial; waiting for boot-complete.target", None
        if found is Found.TRIAL_BOOT:
            self.flow.to(Operation.HEALTH_CHECK)
            return f"checking the health of slot {ctx.booted}", self._start_job(self._health_job(None), "health step")
        self.flow.to(Operation.IDLE)
        self.rebooter.release_when_steady()
        return "settled", None

    async def _boot_complete_timer(self, timeout: float) -> None:
        await self.ctx.clock.sleep(timeout)
        await self.submit(HealthTimeout(timeout))

    def _start_timer(self) -> None:
        self._stop_timer()
        timeout = self.ctx.config.health.boot_complete_timeout
        self._timer = self.ctx.spawn(self._boot_complete_timer(timeout), "the boot-complete timer")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _armed(self, armed: str) -> tuple[str, asyncio.Task | None]:
        """An operator armed a trial (Rollback, Apply): it waits for its reboot, planned by the policy."""
        self.flow.to(Operation.NEED_REBOOT)
        if self.ctx.config.reboot.policy == "manual":
            return f"{armed}; it boots on the next reboot (omaha-agent reboot)", None
        message, job = self._plan_reboot(forced=False)
        return f"{armed}; {message}", job

    def _staged_waits(self) -> tuple[str, asyncio.Task | None]:
        """The operation is ``staged``: say so, and under ``in-window`` plan the reboot that arms it."""
        version = self.ctx.state.staged.version
        self.ctx.status.offer(version, 0)
        if self.ctx.config.install.arm == "in-window":
            return self._plan_reboot(forced=False)
        return f"version {version} is staged; omaha-agent apply arms it", None

    async def _pause_reboot_job(self) -> None:
        """A check while a reboot waits: the reboot job stops (refused once the reboot is being asked for); its
        plan stays, and the check's end plans it again with its time kept."""
        if self.flow.operation is not Operation.REBOOT_PENDING or self.job is None:
            return
        self.rebooter.refuse_once_asked()
        job, self.job = self.job, None  # its end is not applied: the check's end is
        job.cancel()
        await asyncio.wait({job})

    async def _arm_in_window(self) -> None:
        """The reboot job's last step before the reboot: a staged update (``install.arm: in-window``) is armed."""
        if self.ctx.state.staged is None:
            return
        try:
            trial = await staged.arm(self.ctx, self.reporter)
        except CommandFailed as exc:
            raise AttemptFailed(str(exc)) from None
        self.ctx.status.offer(trial.version, 0)

    def _plan_reboot(self, forced: bool) -> tuple[str, asyncio.Task | None]:
        """Plans the reboot into the armed update and runs the reboot job (a running one takes the new plan)."""
        from .windows import describe as when
        version = self.ctx.status.new_version
        plan = self.rebooter.schedule(version, forced)
        message = f"rebooting into {version}" if forced else f"reboot into {version} planned for {when(plan.at)}"
        if self.flow.operation is Operation.REBOOT_PENDING and self.job is not None:
            return message, None
        self.flow.to(Operation.REBOOT_PENDING)
        return message, self._start_job(self._reboot_job(), "reboot")

    # -------------------------------------------------------------- the job protocol
    def advance(self, operation: Operation) -> None:
        """A running job's progress, applied through the machine's transitions (a missing one raises: a bug)."""
        if self.job is None or asyncio.current_task() is not self.job:
            return  # a job that has ended (or code outside any job) changes nothing
        self.flow.to(operation)

    def _start_job(self, coro, what: str) -> asyncio.Task:
        self.job_ended.clear()
        task = asyncio.get_running_loop().create_task(self._job(coro, what))
        self.job, self._what = task, what
        task.add_done_callback(lambda t: self._job_done(t, coro))
        return task

    def _job_done(self, task: asyncio.Task, coro) -> None:
        """The done callback: queues the job's end for the owner (a job cancelled before it ran never awaited
        its body, which is closed here)."""
        if task.cancelled():
            coro.close()
        if not self._closing:
            self._queue.put_nowait((_Ended(task), None))

    async def _job(self, coro, what: str) -> Outcome:
        """A job's body: its message, or its failure as an ``Outcome``; a cancel ends the task cancelled."""
        try:
            message = await coro
            log.info("%s", message)
            return Outcome(True, message)
        except AttemptFailed as exc:
            log.warning("%s failed: %s", what, exc)
            return Outcome(False, str(exc))
        except Exception as exc:  # contained: the job fails, the daemon goes on and backs off
            if not isinstance(exc, (BootError, SlotError, OSError)):
                log.exception("%s failed unexpectedly", what)
            log.error("%s failed: %s", what, describe(exc))
            self.ctx.state.failures += 1
            return Outcome(False, describe(exc))

    def _after(self, what: str) -> Operation:
        """The operation that follows the end of the job ``what``."""
        trial, kept = self.ctx.state.trial, self.ctx.state.staged
        armed = trial is not None and trial.armed and trial.slot != self.ctx.booted
        if kept is not None and not armed and kept.slot != self.ctx.booted:
            return Operation.STAGED  # (a reboot job that failed to arm it, or a Reset: it stays staged)
        if what == "reboot":  # a Reset dropped the plan (and cancelled the job): nothing waits any more
            return Operation.NEED_REBOOT if self.rebooter.plan is not None and armed else Operation.IDLE
        if armed:
            return Operation.NEED_REBOOT
        if what == "health step" and trial is not None and trial.slot == self.ctx.booted:
            # the verdict could not be written (a bootloader error): the trial is still undecided, so it waits
            # again for ConfirmBoot or MarkGood (or the boot-complete timeout)
            return Operation.AWAITING_BOOT_COMPLETE
        return Operation.IDLE

    async def _end_job(self, task: asyncio.Task | None) -> Operation | None:
        """Applies a job's end; returns the operation the job was in, or None for a task that is not the job."""
        if task is None or task is not self.job or not task.done():
            return None
        ctx, before, what = self.ctx, self.flow.operation, self._what
        self.job = None
        outcome = None if task.cancelled() else task.result()
        end = self._after(what)
        if outcome is not None and not outcome.ok:
            ctx.state.last_error = outcome.message
            if end is Operation.IDLE and Operation.REPORTING_ERROR in TRANSITIONS[self.flow.operation]:
                self.flow.to(Operation.REPORTING_ERROR)  # watchers see the failure
        self.flow.to(end)
        if end is Operation.AWAITING_BOOT_COMPLETE:
            self._start_timer()
        in_window = end is Operation.STAGED and ctx.config.install.arm == "in-window"
        dropped = what == "reboot" or (self.rebooter.plan is not None and end is not Operation.NEED_REBOOT
                                       and not in_window)  # (a check that replaced the waiting update by a staged one)
        if dropped and self.rebooter.drop():
            await ctx.save("the dropped postponement")
        if end is Operation.STAGED and what != "reboot":  # (a failed arm in the window is not re-planned at once)
            message, _ = self._staged_waits()
            log.info("%s", message)
        if end is Operation.NEED_REBOOT:
            if ctx.status.new_version != ctx.state.trial.version:  # (a newer offer declined or failed meanwhile)
                ctx.status.offer(ctx.state.trial.version, 0)
            if what != "reboot" and ctx.config.reboot.policy != "manual":  # a reboot job that ended asked for it
                message, _ = self._plan_reboot(forced=False)
                log.info("%s", message)
        if self.flow.operation is Operation.IDLE:
            ctx.status.clear_offer()
            self.rebooter.release_when_steady()
        await ctx.save(f"the end of the {what}")
        if ctx.state.events:  # what a cancelled or failed job left queued goes out now, not at the next check
            ctx.spawn(self.reporter.flush(), "sending the queued events")
        self.job_ended.set()
        return before

    async def _reboot_job(self) -> str:
        return await self.rebooter.run(once=self.once)

    async def _health_job(self, failure: str | None) -> str:
        ok = await self.settler.health_step(failure)
        await self.ctx.status.refresh_slots()
        await self.reporter.flush()
        if not ok:
            raise AttemptFailed(self.ctx.state.last_error)
        return f"slot {self.ctx.booted} is good"

    # -------------------------------------------------------------- stop
    async def close(self) -> None:
        """Stops: the job is cancelled (a download keeps its checkpoint), then the queue; every command still
        queued is answered that the agent is stopping."""
        self._closing = True
        self._stop_timer()
        for task in (self.job, self._runner):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: B036 - stopping: whatever the task ended with is logged by it
                    pass
        while not self._queue.empty():
            _, answer = self._queue.get_nowait()
            if answer is not None and not answer.done():
                answer.set_result(_stopping())
