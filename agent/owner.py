"""The one owner of every transition: commands from every entry point are executed here, one at a time, in the
order they arrive; ``machine.decide`` answers each (act, no-op or refuse) and only an ``Act`` has an effect.

Long work runs as the owner's one job (the update attempt, or the health step of a trial boot): a task it starts,
can cancel, and whose end it hears as its own ``JobDone`` command, which sets the operation the job ended in. While
a job runs, commands keep being answered at once (from the table), and reads (status, properties) never wait.

Faults are contained: an exception in a command or a job (a bootloader, disk, state-save or network error, or a
bug) fails that command or job with a one-line reason in ``LastError`` and the journal; the owner goes on.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .attempt import AttemptFailed
from .boot import BootError, SlotState
from .logind import LogindError
from .machine import (
    TRIAL_BOOT, Act, Action, Command, Decision, HealthTimeout, JobDone, MarkGood, NoOp, Operation, Refuse, decide,
)
from .reboot import Rebooter, Refused
from .settle import Found
from .slots import SlotError

log = logging.getLogger("omaha-agent")


@dataclass(frozen=True)
class Failed:
    """An ``Act`` whose execution failed; ``reason`` is the one line a user sees."""

    reason: str


@dataclass(frozen=True)
class Outcome:
    """How a job ended."""

    ok: bool
    message: str


@dataclass(frozen=True)
class Reply:
    result: Act | NoOp | Refuse | Failed
    message: str
    job: asyncio.Task | None = None  # the job the command started; awaiting it gives its Outcome

    @property
    def acted(self) -> bool:
        return isinstance(self.result, Act)


class CommandFailed(Exception):
    """A command could not be carried out; the message is the one line a user sees."""


def describe(exc: BaseException) -> str:
    """One line for ``LastError``: the adapters' own messages as they are, anything else named."""
    if isinstance(exc, (BootError, SlotError, AttemptFailed, CommandFailed, LogindError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"internal error: {type(exc).__name__}: {str(exc)[:200]}"


class Owner:
    def __init__(self, ctx, settler, attempt, *, wait_for_boot_complete: bool = False, rebooter=None):
        self.ctx = ctx
        self.settler = settler
        self.attempt = attempt
        self.reporter = attempt.reporter
        self.rebooter = rebooter or Rebooter(ctx, self.reporter.http)
        self.wait_for_boot_complete = wait_for_boot_complete
        self.once = False  # a one-shot run: the reboot job does not wait (for a window, a lock, an inhibitor)
        self._reset = False  # a reset cancelled the reboot job: it ends in idle
        self.job: asyncio.Task | None = None
        self.job_ended = asyncio.Event()  # set whenever a job ends (the schedule plans the next check then)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None
        self._closing = False
        self._cancelling = False
        self._reported: set[asyncio.Task] = set()  # jobs whose JobDone is queued

    @property
    def flow(self):
        return self.ctx.status.flow

    # -------------------------------------------------------------- the queue
    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, command: Command) -> Reply:
        """Hands ``command`` to the owner and waits for its answer (not for a job it starts: see ``Reply.job``)."""
        if self._closing or self._runner is None or self._runner.done():
            return Reply(Refuse("the agent is stopping", "Stopping"), "the agent is stopping")
        answer = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((command, answer))
        return await asyncio.shield(answer)

    async def _run(self) -> None:
        while True:
            command, answer = await self._queue.get()
            try:
                reply = await self._handle(command)
            except asyncio.CancelledError:
                if not answer.done():
                    answer.set_result(Reply(Refuse("the agent is stopping", "Stopping"), "the agent is stopping"))
                raise
            except BaseException as exc:  # _handle contains everything; this is the last line of defence
                log.exception("command %s failed", type(command).__name__)
                reply = Reply(Failed(describe(exc)), describe(exc))
            if not answer.done():
                answer.set_result(reply)

    async def _booted_good(self, operation: Operation, command: Command) -> bool:
        """The one fact ``decide`` needs from the bootloader: is the running slot good (mark-good while idle)?"""
        if not isinstance(command, MarkGood) or operation in TRIAL_BOOT or operation is Operation.STARTING:
            return True
        try:
            return (await self.ctx.boot.status())[self.ctx.booted].state is SlotState.GOOD
        except (BootError, KeyError):
            return False

    async def _handle(self, command: Command) -> Reply:
        operation = self.flow.operation
        booted_good = await self._booted_good(operation, command)
        decision: Decision = decide(operation, command, self.ctx.status.new_version, booted_good)
        name = type(command).__name__
        if isinstance(decision, Act):
            try:
                message, job = await self._act(decision.action, command)
                reply = Reply(decision, message, job)
            except Refused as exc:  # what only acting could tell (a postponement past its bound)
                log.info("%s in %s: refuse (%s)", name, operation.value, exc.refuse.reason)
                reply = Reply(exc.refuse, exc.refuse.reason)
            except Exception as exc:
                reason = describe(exc)
                if not isinstance(exc, (BootError, SlotError, OSError, CommandFailed)):
                    log.exception("%s failed unexpectedly", name)
                log.error("%s: %s", name, reason)
                await self._record_error(reason)
                reply = Reply(Failed(reason), reason)
        else:
            reply = Reply(decision, decision.reason)
            if not isinstance(command, JobDone):
                log.info("%s in %s: %s (%s)", name, operation.value, type(decision).__name__.lower(), decision.reason)
        return reply

    async def _save(self, what: str) -> None:
        try:
            await self.ctx.store.commit()
        except OSError as exc:
            log.error("could not save %s: %s", what, describe(exc))

    async def _record_error(self, reason: str) -> None:
        self.ctx.state.last_error = reason
        self.ctx.status.notify()
        await self._save("the state")

    # -------------------------------------------------------------- actions
    async def _act(self, action: Action, command: Command) -> tuple[str, asyncio.Task | None]:
        ctx, status = self.ctx, self.ctx.status
        if action is Action.SETTLE:
            return await self._settle()
        if action is Action.END_JOB:
            return await self._end_job(command), None
        if action is Action.START_UPDATE_JOB:
            self.flow.to(Operation.CHECKING)
            return "checking for an update", self._start_job(self._update_job(command.interactive), "check")
        if action is Action.START_INSTALL_JOB:
            self.flow.to(Operation.CHECKING)
            job = self._update_job_from(command.path, command.signature, command.version)
            return f"installing {command.path}", self._start_job(job, "install")
        if action is Action.CANCEL_JOB:
            if self.job is None or self.job.done() or self._cancelling:
                return "already cancelling", None
            self._cancelling = True
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
            if self.rebooter.drop():
                await self._save("the dropped postponement")  # before the caller hears it
            if self.flow.operation is Operation.REBOOT_PENDING and self.job is not None and not self.job.done():
                self._reset = True  # the reboot job ends in idle
                self.job.cancel()
                return f"the planned reboot is dropped; version {status.new_version} stays installed", None
            self.flow.to(Operation.IDLE)
            status.clear_offer()
            return "idle", None
        if action is Action.REBOOT:
            return self._plan_reboot(forced=True)
        if action is Action.POSTPONE_REBOOT:
            message = self.rebooter.postpone(command.seconds)
            await self._save("the postponement")  # on disk before the caller hears it: a restart keeps it
            return message, None
        raise AssertionError(f"no execution for {action}")

    async def _settle(self) -> tuple[str, asyncio.Task | None]:
        ctx = self.ctx
        try:
            found = await self.settler.settle()
        except Exception as exc:
            self.flow.to(Operation.IDLE)  # the daemon goes on; the next start settles again
            raise CommandFailed(f"start-up could not settle the last update: {describe(exc)}") from None
        if found is not Found.WAITING and ctx.state.postponed is not None:
            ctx.state.postponed = None  # the reboot it postponed came (or the update is gone)
            await self._save("the end of the postponement")
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

    async def _end_job(self, done: JobDone) -> str:
        if done.job is not None and done.job is not self.job:  # a late word from a job that already ended
            return "stale"
        before = self.flow.operation
        self.job = None
        if not self.flow.end_job(done.operation, done.failed):
            log.error("a job ended in %s after %s, which the state machine has no transition for",
                      done.operation.value, before.value)
        if done.operation is Operation.AWAITING_BOOT_COMPLETE:
            self._start_timer()
        if before is Operation.REBOOT_PENDING:
            self._reset = False
            if self.rebooter.drop():
                await self._save("the dropped postponement")
        if (done.operation is Operation.NEED_REBOOT and before is Operation.FINALIZING
                and self.ctx.config.reboot.policy != "manual"):
            message, _ = self._plan_reboot(forced=False)
            log.info("%s", message)
        if self.flow.operation is Operation.IDLE:
            self.ctx.status.clear_offer()
            self.rebooter.release_when_steady()
        if self.ctx.state.events:  # what a cancelled or failed job left queued goes out now, not at the next check
            self.ctx.spawn(self.reporter.flush(), "sending the queued events")
        self.job_ended.set()
        return done.operation.value

    # -------------------------------------------------------------- jobs
    def _start_job(self, coro, what: str) -> asyncio.Task:
        self.job_ended.clear()
        task = asyncio.get_running_loop().create_task(self._job(coro, what))
        self.job = task
        task.add_done_callback(lambda t: self._job_gone(t, coro, what))
        return task

    def _job_gone(self, task: asyncio.Task, coro, what: str) -> None:
        """A job cancelled before its first step never ran ``_job``'s body (the cancel is thrown at its very start),
        and one cancelled again while it queued its JobDone may end cancelled: the JobDone it did not send is
        queued here, so the machine always leaves the job's operation."""
        if task.cancelled() and not self._closing and task not in self._reported:
            coro.close()  # never awaited when the cancel came first (a no-op when it ran)
            self._cancelling = False
            self._queue.put_nowait((JobDone(self._job_end(what), False, task),
                                    asyncio.get_running_loop().create_future()))
        self._reported.discard(task)

    async def _job(self, coro, what: str) -> Outcome:
        """Runs a job's body; whatever happens (a failure, a cancel, even a cancel that lands while the failure
        is being saved), the owner hears ``JobDone``: a job never leaves the machine in its operation."""
        failed, message = False, "cancelled"
        try:
            try:
                message = await coro
            except AttemptFailed as exc:
                failed, message = True, str(exc)
                log.warning("%s failed: %s", what, message)
                if self.ctx.state.last_error != message:
                    await self._record_error(message)
            except asyncio.CancelledError:
                if self._closing:
                    raise
                asyncio.current_task().uncancel()
            except Exception as exc:  # contained: the job fails, the daemon goes on and backs off
                failed, message = True, describe(exc)
                if not isinstance(exc, (BootError, SlotError, OSError)):
                    log.exception("%s failed unexpectedly", what)
                log.error("%s failed: %s", what, message)
                self.ctx.state.failures += 1
                await self._record_error(message)
        except asyncio.CancelledError:  # a second cancel while the failure was being saved
            if self._closing:
                raise
            asyncio.current_task().uncancel()
        finally:
            self._cancelling = False
        if not self._closing:
            task = asyncio.current_task()
            self._reported.add(task)
            await self.submit(JobDone(self._job_end(what), failed, task))
        return Outcome(not failed, message)

    def _plan_reboot(self, forced: bool) -> tuple[str, asyncio.Task | None]:
        """Plans the reboot into the armed update and runs the reboot job (a running one takes the new plan)."""
        version = self.ctx.status.new_version
        plan = self.rebooter.schedule(version, forced)
        from .windows import describe as when
        message = f"rebooting into {version}" if forced else f"reboot into {version} planned for {when(plan.at)}"
        if self.flow.operation is Operation.REBOOT_PENDING and self.job is not None and not self.job.done():
            return message, None
        self.flow.to(Operation.REBOOT_PENDING)
        return message, self._start_job(self._reboot_job(), "reboot")

    async def _reboot_job(self) -> str:
        message = await self.rebooter.run(once=self.once)
        log.info("%s", message)
        return message

    def _job_end(self, what: str) -> Operation:
        if what == "reboot" and self._reset:
            return Operation.IDLE
        trial = self.ctx.state.trial
        if trial is not None and trial.armed and trial.slot != self.ctx.booted:
            return Operation.NEED_REBOOT
        if what == "health step" and trial is not None and trial.slot == self.ctx.booted:
            # the verdict could not be written (a bootloader or disk error): the trial is still undecided, so
            # it waits again for ConfirmBoot or MarkGood (or the boot-complete timeout), not idle
            return Operation.AWAITING_BOOT_COMPLETE
        return Operation.IDLE

    async def _update_job(self, interactive: bool) -> str:
        message = await self.attempt.run(interactive)
        log.info("%s", message)
        return message

    async def _update_job_from(self, path: str, signature: str, version: str) -> str:
        message = await self.attempt.run_file(path, signature, version)
        log.info("%s", message)
        return message

    async def _health_job(self, failure: str | None) -> str:
        ok = await self.settler.health_step(failure)
        await self.ctx.status.refresh_slots()
        await self.reporter.flush()
        if not ok:
            raise AttemptFailed(self.ctx.state.last_error)
        return f"slot {self.ctx.booted} is good"

    # -------------------------------------------------------------- stop
    async def close(self) -> None:
        """Stops: a running download is cancelled (its checkpoint is kept), then the queue."""
        self._closing = True
        self._stop_timer()
        for task in (self.job, self._runner):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: B036 - stopping: whatever the task ended with is logged by it
                    pass

